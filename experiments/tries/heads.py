"""The harness of issue 13's tries: train LexVLA heads on cached Flickr8k features, evaluate on val.

Ran on the `small-offline` preset as of commit 4f0fb33 (before the recipe became its default), so
every try names its overrides from that base. Features come from cache_features.py; `--grid g`
average-pools the 16 x 16 patch grid to g x g (4: 16 patches, for speed). Results:
experiments/results/issue13_tries.json. Run from the repository root:
  .venv/bin/python experiments/tries/heads.py NAME --grid 4 --eval-every 300 --set train.steps=1200 ...
`--input-words W` (tries m1, m2) adds W on the caption's words (`TextTower.bag_of_words`) to the text
activations in training and evaluation; `--learn-iw` trains W (as exp(log W)). Those ran at commit
cf1b547, before the preset had `model.text.input_words_weight` (the product's version of this).
"""
import json, sys, time, math, argparse
import torch
torch.set_num_threads(int(__import__("os").environ.get("EXP_THREADS", "1")))
from safetensors.torch import load_file
from lexvla.presets import get_preset
from lexvla.config import apply_overrides, to_dict
from lexvla.models.lexvla import LexVLA
from lexvla.losses import LexVLAObjective
from lexvla.train.optim import create_optimizer, create_scheduler
from lexvla.eval.words import word_quality
from lexvla.train.targets import CaptionWordTargets
from lexvla.eval.metrics import retrieval_recall
from lexvla.layers.lexical import sparsify_topk, sparsify_threshold

ap = argparse.ArgumentParser()
ap.add_argument("name"); ap.add_argument("--set", nargs="*", default=[])
ap.add_argument("--eval-every", type=int, default=0)
ap.add_argument("--input-words", type=float, default=0.0)
ap.add_argument("--learn-iw", action="store_true")
ap.add_argument("--grid", type=int, default=8, help="average-pool the 16x16 patch grid to this side (16: full)")
args = ap.parse_args()
F = "/work/scratch/feats"
import torch.nn.functional as TF
cfg = get_preset("small-offline")
cfg = apply_overrides(cfg, args.set)
torch.manual_seed(cfg.train.seed)
meta_tr = json.load(open(f"{F}/meta_train.json")); meta_va = json.load(open(f"{F}/meta_val.json"))
img_tr = load_file(f"{F}/img_train.safetensors")["features"]
txt_tr = load_file(f"{F}/txt_train.safetensors")["features"]
img_va = load_file(f"{F}/img_val.safetensors")["features"]
txt_va = load_file(f"{F}/txt_val.safetensors")["features"]
def pool(x):
    if args.grid == 16: return x
    n = x.shape[0]; f = 16 // args.grid
    x = x.view(n, args.grid, f, args.grid, f, -1).float().mean((2, 4)).reshape(n, args.grid**2, -1)
    return x.half()
img_tr = torch.cat([pool(img_tr[i:i+500]) for i in range(0, len(img_tr), 500)])
img_va = pool(img_va)
cap_start = torch.tensor([0] + [len(c) for c in meta_tr["captions"]]).cumsum(0)
caps_va = [c for cs in meta_va["captions"] for c in cs]
t2i_va = torch.tensor([i for i, cs in enumerate(meta_va["captions"]) for _ in cs])
model = LexVLA(cfg.model)
model.train()
iw_param = torch.nn.Parameter(torch.tensor(float(args.input_words)).log()) if args.input_words > 0 else None
if iw_param is not None:
    bag_tr = model.text.bag_of_words([c for cs in meta_tr["captions"] for c in cs]).to_sparse()
    bag_va = model.text.bag_of_words(caps_va)
def add_words(act, bag):
    w = iw_param.exp() if args.learn_iw else iw_param.detach().exp()
    return act + w * bag
params = dict(model.trainable_parameters())
if args.learn_iw: params["iw"] = iw_param
opt = create_optimizer(params, cfg.train)
sched = create_scheduler(opt, cfg.train)
obj = LexVLAObjective(cfg.loss, max_scale=cfg.model.logit_scale_max)
targets_of = CaptionWordTargets(model.vocab)
N = len(img_tr); B = cfg.train.batch_size
g = torch.Generator().manual_seed(cfg.train.seed)
perm = torch.randperm(N, generator=g); pos = 0
log = []

@torch.no_grad()
def evaluate(step):
    model.eval()
    iw = torch.cat([model.vision(img_va[i:i+50].float())[0] for i in range(0, len(img_va), 50)])
    if cfg.model.text.encoder == "bow":
        tw = model.text(model.text.bag_of_words(caps_va))
    elif iw_param is not None:
        tw = TF.normalize(add_words(model.text.activations(txt_va.float()), bag_va), dim=-1)
    else:
        tw = model.text(txt_va.float())
    model.train()
    wq = word_quality(iw, tw, t2i_va, caps_va, model.vocab.words)
    out = {"step": step, "img_prec": wq["image_precision"], "txt_prec": wq["text_precision"],
           "act_img": wq["active_words"]["image"], "act_txt": wq["active_words"]["text"],
           "over_img": [(w["word"], round(w["share"], 2)) for w in wq["overused_words"]["image"][:8]],
           "over_txt": [(w["word"], round(w["share"], 2)) for w in wq["overused_words"]["text"][:8]],
           "meaningless": wq["meaningless_overused"]}
    for name, f in (("thr", lambda w: sparsify_threshold(w)), ("top300", lambda w: sparsify_topk(w, 300)), ("dense", lambda w: w)):
        r = retrieval_recall(f(iw) @ f(tw).T, t2i_va)
        out[name] = {k.replace("image_to_text", "i2t").replace("text_to_image", "t2i"): round(v, 1) for k, v in r.items()}
    print(json.dumps(out), flush=True)
    return out

t0 = time.time()
for step in range(cfg.train.steps):
    if pos + B > N:
        perm = torch.randperm(N, generator=g); pos = 0
    idx = perm[pos:pos+B]; pos += B
    cap_idx = cap_start[idx] + torch.randint(0, 5, (B,), generator=g).clamp_max(cap_start[idx+1]-cap_start[idx]-1)
    if cfg.model.text.encoder == "bow":
        flat = [c for cs in meta_tr["captions"] for c in cs]
        tf = model.text.bag_of_words([flat[i] for i in cap_idx.tolist()])
    else:
        tf = txt_tr[cap_idx].float()
    out = model(image_features=img_tr[idx].float(), text_features=tf, patch_keep=cfg.train.patch_keep)
    if iw_param is not None:
        out["text_activations"] = add_words(out["text_activations"], torch.index_select(bag_tr, 0, cap_idx).to_dense())
        out["text_weights"] = TF.normalize(out["text_activations"], dim=-1)
    pin = (out["image_activations"], out["text_activations"]) if cfg.loss.penalty_on == "activations" else None
    wt = targets_of([meta_tr["captions"][i] for i in idx.tolist()]) if cfg.loss.caption_words_weight > 0 else None
    losses = obj(out["image_weights"], out["text_weights"], out["logit_scale"], step, pin, wt, (out["image_activations"], out["text_activations"]))
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(list(model.trainable_parameters().values()), cfg.train.grad_clip)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    if step % 25 == 0 or step == cfg.train.steps - 1:
        extra = {n: round(float(p.detach().flatten()[0]), 3) for n, p in model.named_parameters() if "affine" in n}
        if iw_param is not None: extra["iw"] = round(float(iw_param.exp()), 3)
        print(step, f"{time.time()-t0:.0f}s", {k: round(float(v), 4) for k, v in losses.items()}, extra, flush=True)
    if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < cfg.train.steps:
        log.append(evaluate(step + 1))
log.append(evaluate(cfg.train.steps))
from safetensors.torch import save_file
save_file({k: v.detach().contiguous() for k, v in model.trainable_parameters().items()}, f"/work/scratch/results/{args.name}.safetensors")
json.dump({"name": args.name, "set": args.set, "grid": args.grid, "time": time.time() - t0, "evals": log}, open(f"/work/scratch/results/{args.name}.json", "w"), indent=1)
