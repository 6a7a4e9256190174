import json, sys, time, torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from lexvla.train.baseline import DenseBaseline, dense_retrieval
from lexvla.losses import info_nce
from lexvla.config import TrainConfig
from lexvla.train.optim import create_optimizer, create_scheduler
F="/work/scratch/feats"
steps=int(sys.argv[1]); B=int(sys.argv[2]) if len(sys.argv)>2 else 32
meta_tr=json.load(open(f"{F}/meta_train.json")); meta_va=json.load(open(f"{F}/meta_val.json"))
img_tr=load_file(f"{F}/img_train.safetensors")["features"].float().mean(1, keepdim=True)
txt_tr=load_file(f"{F}/txt_train.safetensors")["features"]
img_va=load_file(f"{F}/img_val.safetensors")["features"].float().mean(1, keepdim=True)
txt_va=load_file(f"{F}/txt_val.safetensors")["features"]
t2i=torch.tensor([i for i,cs in enumerate(meta_va["captions"]) for _ in cs])
cap_start=torch.tensor([0]+[len(c) for c in meta_tr["captions"]]).cumsum(0)
cfg=TrainConfig(steps=steps,batch_size=B)
torch.manual_seed(0)
m=DenseBaseline(384,576); p=dict(m.named_parameters())
opt=create_optimizer(p,cfg); sch=create_scheduler(opt,cfg)
g=torch.Generator().manual_seed(0); N=len(img_tr); perm=torch.randperm(N,generator=g); pos=0
for s in range(steps):
    if pos+B>N: perm=torch.randperm(N,generator=g); pos=0
    idx=perm[pos:pos+B]; pos+=B
    ci=cap_start[idx]+torch.randint(0,5,(B,),generator=g)
    loss=info_nce(m.encode_image(img_tr[idx]),m.encode_text(txt_tr[ci]),m.logit_scale.exp())
    loss.backward(); torch.nn.utils.clip_grad_norm_(p.values(),1.0); opt.step(); sch.step(); opt.zero_grad()
r=dense_retrieval(m,img_va,txt_va,t2i)
print(steps, B, {k:round(v,1) for k,v in r.items() if "/R@" in k})
