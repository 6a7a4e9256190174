"""Ceiling probe 1 of issue 13 (experiments/results/issue13_word_probe.json): kNN, linear and MLP caption-word
classifiers on mean-pooled frozen patch features (scratch harness; paths of the development machine)."""
import json, sys, time, torch, torch.nn.functional as F
torch.set_num_threads(2)
from safetensors.torch import load_file
from lexvla.presets import get_preset
from lexvla.models.lexvla import LexVLA
from lexvla.train.targets import CaptionWordTargets
from lexvla.eval.words import word_quality
Fd = "/work/scratch/feats"
cfg = get_preset("small-offline")
model = LexVLA(cfg.model); vocab = model.vocab
meta_tr = json.load(open(f"{Fd}/meta_train.json")); meta_va = json.load(open(f"{Fd}/meta_val.json"))
def pooled(name):
    x = load_file(f"{Fd}/{name}")["features"]
    return torch.cat([x[i:i+500].float().mean(1) for i in range(0, len(x), 500)])
xtr, xva = pooled("img_train.safetensors"), pooled("img_val.safetensors")
print(xtr.shape, xva.shape, flush=True)
tg = CaptionWordTargets(vocab)
ytr = tg(meta_tr["captions"]); 
caps_va = [c for cs in meta_va["captions"] for c in cs]
t2i = torch.tensor([i for i, cs in enumerate(meta_va["captions"]) for _ in cs])
dummy_t = torch.rand(len(caps_va), vocab.size)
def prec(W, name):
    wq = word_quality(W, dummy_t, t2i, caps_va, vocab.words)
    print(name, "img_prec", round(wq["image_precision"],1), "fixed", round(wq["fixed_answer_precision"],1), flush=True)
mu, sd = xtr.mean(0), xtr.std(0)
ntr, nva = F.normalize((xtr-mu)/sd, dim=-1), F.normalize((xva-mu)/sd, dim=-1)
sim = nva @ ntr.T
for k in (5, 10, 25, 50):
    v, i = sim.topk(k, dim=1)
    W = (torch.softmax(v * 20, 1)[:, :, None] * ytr[i]).sum(1)
    prec(W, f"knn{k}")
# linear / mlp probes, softmax CE against soft targets
for kind in ("linear", "mlp"):
    torch.manual_seed(0)
    d = xtr.shape[1]
    net = torch.nn.Linear(d, vocab.size) if kind == "linear" else torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.GELU(), torch.nn.Linear(1024, vocab.size))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    Xn = (xtr-mu)/sd; Xv = (xva-mu)/sd
    for ep in range(30):
        perm = torch.randperm(len(Xn))
        for j in range(0, len(Xn), 128):
            b = perm[j:j+128]
            loss = -(ytr[b] * F.log_softmax(net(Xn[b]), -1)).sum(-1).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        if ep % 5 == 4:
            with torch.no_grad(): prec(torch.softmax(net(Xv), -1), f"{kind} ep{ep+1} loss {loss.item():.3f}")
