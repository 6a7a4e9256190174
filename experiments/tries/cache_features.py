"""Cache frozen DINOv2-S patch features and SmolLM2 last-token states for Flickr8k."""
import json, sys, time
import torch
from safetensors.torch import save_file
import lexvla
from lexvla.data.transforms import load_image

root = "/work/shared/data/flickr8k"
data = json.load(open(f"{root}/annotations/dataset_flickr8k.json"))
model = lexvla.create_model("small-offline").eval()
out = "/work/scratch/feats"
what = sys.argv[1:] or ["img", "txt"]
for split in ("val", "train"):
    ims = [im for im in data["images"] if im["split"] == split]
    meta = {"files": [im["filename"] for im in ims], "captions": [[s["raw"] for s in im["sentences"]] for im in ims]}
    json.dump(meta, open(f"{out}/meta_{split}.json", "w"))
    if "img" in what:
        feats = []
        t0 = time.time()
        with torch.no_grad():
            for i in range(0, len(ims), 32):
                imgs = [load_image(f"{root}/images/{im['filename']}") for im in ims[i:i+32]]
                f = model.encode_image_features(imgs)
                feats.append(f.half())
                if i % 640 == 0:
                    print(split, "img", i, len(ims), f"{time.time()-t0:.0f}s", flush=True)
        save_file({"features": torch.cat(feats)}, f"{out}/img_{split}.safetensors")
    if "txt" in what:
        caps = [c for cs in meta["captions"] for c in cs]
        feats = []
        t0 = time.time()
        with torch.no_grad():
            for i in range(0, len(caps), 64):
                feats.append(model.text.forward_features(caps[i:i+64]))
                if i % 1280 == 0:
                    print(split, "txt", i, len(caps), f"{time.time()-t0:.0f}s", flush=True)
        save_file({"features": torch.cat(feats)}, f"{out}/txt_{split}.safetensors")
