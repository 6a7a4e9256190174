"""Ceiling probe 2: a caption-word classifier on all 256 patch features (attention pooling + MLP)."""
import json, torch, torch.nn.functional as F
torch.set_num_threads(1)
from safetensors.torch import load_file
from lexvla.presets import get_preset
from lexvla.models.lexvla import LexVLA
from lexvla.train.targets import CaptionWordTargets
from lexvla.eval.words import word_quality
Fd = "/work/scratch/feats"
cfg = get_preset("small-offline"); vocab = LexVLA(cfg.model).vocab
meta_tr = json.load(open(f"{Fd}/meta_train.json")); meta_va = json.load(open(f"{Fd}/meta_val.json"))
xtr = load_file(f"{Fd}/img_train.safetensors")["features"]; xva = load_file(f"{Fd}/img_val.safetensors")["features"]
ytr = CaptionWordTargets(vocab)(meta_tr["captions"])
caps_va = [c for cs in meta_va["captions"] for c in cs]
t2i = torch.tensor([i for i, cs in enumerate(meta_va["captions"]) for _ in cs])
dummy = torch.rand(len(caps_va), vocab.size)
class Net(torch.nn.Module):
    def __init__(s, d=384, q=4):
        super().__init__(); s.norm = torch.nn.LayerNorm(d); s.q = torch.nn.Parameter(torch.randn(q, d) / d**.5)
        s.mlp = torch.nn.Sequential(torch.nn.Linear(d * q, 1024), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(1024, vocab.size))
    def forward(s, x):
        x = s.norm(x.float()); a = torch.softmax(torch.einsum("qd,bpd->bqp", s.q, x), -1)
        return s.mlp(torch.einsum("bqp,bpd->bqd", a, x).flatten(1))
torch.manual_seed(0); net = Net(); opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
for ep in range(12):
    net.train(); perm = torch.randperm(len(xtr))
    for j in range(0, len(xtr), 64):
        b = perm[j:j+64]; loss = -(ytr[b] * F.log_softmax(net(xtr[b]), -1)).sum(-1).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad(): W = torch.cat([torch.softmax(net(xva[i:i+100]), -1) for i in range(0, len(xva), 100)])
    wq = word_quality(W, dummy, t2i, caps_va, vocab.words)
    print("attnpool ep", ep + 1, "loss", round(loss.item(), 3), "img_prec", round(wq["image_precision"], 1), flush=True)
