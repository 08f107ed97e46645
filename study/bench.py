r"""Throughput and peak memory: whole stages end to end (data included: what a user gets), and the model step alone.

End to end: each stage's own main() on real data, img/s of its last epoch (the others warm up). Beside it, its data
path alone (loader, then + augmentation) and its share of a step's time: is data or model the limit? For files and
packed stores, one worker core's rate too. With --pack, the image folder is also packed (data/pack.py, its rate
measured) and every stage measured from the store beside the files, with the ratios. Model step: forward, backward,
AdamW on random images. bf16 autocast on CUDA, fp32 on CPU; timm's ViT-Tiny too if installed. Speed targets live
here, never in the tests.

    python -m study.bench                            # CPU: the four stages on the embedded data, then model steps
    python -m study.bench --stages=mae --data=imagefolder --data_root=/tmp/jpegs --make_jpegs=300 --pack \
        --stage_model=micro --stage_img_size=224 --stage_patch=16 --stage_batch=64 --model_steps=false  # store vs JPEG
    python -m study.bench --model_steps=false --stages=mae --data=imagefolder --data_root=/tmp/jpegs --make_jpegs=2000 \
        --pack --stage_model=tiny --stage_img_size=224 --stage_patch=16 --stage_batch=512 --num_workers=14   # GPU
"""
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

try:  # `python study/bench.py` puts study/, not the stages' folder, on the path
    import finetune
except ModuleNotFoundError as e:
    if e.name != "finetune":
        raise
    raise SystemExit("study/bench.py is part of the study package: run it from the project's folder as "
                     "python -m study.bench") from None
import pretrain_contrastive
import pretrain_mae
from checkpoint import read_log, write_text
from common import autocast_ctx
from augment import crop_box
from data import FileImages, Loader, build_dataset, crop_pil, open_image, pack_image
from flags import check, check_config, cli, int_list
from model import create_vit
from pretrain_mae import MAE, Config as MAEConfig
from store import PackedImages

STAGES = dict(mae=pretrain_mae, finetune=finetune, mocov3=pretrain_contrastive, dino=pretrain_contrastive)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    # end to end
    stages: str = "mae,finetune,mocov3,dino"  # comma-separated, of mae | finetune | mocov3 | dino; "" = none
    data: str = "embedded"  # as the stages' --data
    data_root: str = ""  # as the stages' --data_root
    make_jpegs: int = 0  # first write this many JPEGs at ImageNet's sizes into data_root/val, 10 links each in train/
    pack: bool = False  # --data=imagefolder: also pack data_root (data/pack.py) and measure each stage from the store
    fidelity_sides: str = "192,256,320"  # with --pack: crops from stores of these shorter sides against the files'
    rounds: int = 1  # with --pack: each stage from the files then the store, this many times (a ratio per pair)
    stage_model: str = "cpu"  # ViT size for the stages
    stage_img_size: int = 32  # input side for the stages
    stage_patch: int = 4  # patch side for the stages
    stage_batch: int = 256  # batch_size_per_gpu for the stages
    stage_epochs: int = 3  # epochs per stage; the last one is reported
    stage_subset: int = 0  # use only this many training images (0 = all)
    num_workers: int = 2  # loader processes (file data only)
    # model step alone
    model_steps: bool = True  # also time the model step on random images
    model: str = ""  # one size to measure; empty = cpu at 32 px and tiny at 224 px
    img_size: int = 224  # input side, when model is given
    patch_size: int = 16  # patch side, when model is given
    num_heads: int = 0  # attention heads; 0 = the size's default (timm's vit_tiny has 3)
    batch_size: int = 0  # images per step; 0 = 256 on CUDA, 32 on CPU
    steps: int = 5  # timed steps after 2 warm-up steps
    compile: bool = False  # torch.compile the model (stages and model steps; CUDA)
    threads: int = 0  # CPU threads for torch (0 = torch's default: one per core)
    out: str = ""  # also write the results to this JSON file

    def __post_init__(self):
        check_config(self, make_jpegs=">=0", stage_img_size=">0", stage_patch=">0", stage_batch=">0",
                     stage_epochs=">0", stage_subset=">=0", rounds=">0", batch_size=">=0", steps=">0", threads=">=0")
        check(all(s in STAGES for s in self.stage_list()), f"stages must be of {tuple(STAGES)}, got {self.stages!r}")
        check(not self.pack or self.data == "imagefolder", "--pack packs an image folder: give --data=imagefolder")
        check(not self.make_jpegs or not (os.path.isdir(self.data_root) and os.listdir(self.data_root)),
              f"--make_jpegs writes a new folder, and {self.data_root} is not empty: drop --make_jpegs to measure the "
              "images already there, or give another --data_root")

    def stage_list(self):
        return [s.strip() for s in self.stages.split(",") if s.strip()]


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide high-water mark (Linux: KiB)


def device_name(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def make_jpegs(root, n, classes=10, copies=10):
    """n JPEGs at ImageNet's common sizes; train/ links each `copies` times so an epoch is long enough to time."""
    sizes = [(375, 500), (333, 500), (500, 375), (480, 640), (500, 500)]
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        low = torch.rand(1, 3, 8, 8, generator=g) * 255
        img = F.interpolate(low, (h, w), mode="bicubic") + torch.randn(1, 3, h, w, generator=g) * 8
        path = os.path.join(root, "val", f"c{i % classes}", f"{i}.jpg")
        Image.fromarray(img[0].clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(path, quality=90)
        for k in range(copies):
            os.link(path, os.path.join(root, "train", f"c{i % classes}", f"{i}_{k}.jpg"))


def pack(root, out):
    """Pack an image folder with data/pack.py, as a user would: its img/s on every core."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "data", "pack.py"), f"--data_root={root}",
                          f"--out_dir={out}"], capture_output=True, text=True)
    check(run.returncode == 0, f"packing {root} failed: {run.stderr.strip()[-500:]}")
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "meta.json")) as f:
        return sum(json.load(f)["images"].values()) / seconds


def fidelity(root, side, n=100, seeds=4, views=((224, (0.08, 1.0)), (224, "center"))):
    """Crops cut from images as a store at `side` holds them against crops cut from the files (crop_pil, as the
    workers), the same boxes: per view, the mean absolute difference (uint8 levels) and the PSNR (dB); bytes per
    image. The first n val images and data/grace_hopper.jpg (a photograph)."""
    paths = [p for p, _ in build_dataset("imagefolder", root, False)[0].samples[:n]]
    paths.append(os.path.join(ROOT, "data", "grace_hopper.jpg"))
    sums, nbytes = [[0.0, 0.0, 0] for _ in views], 0
    for path in paths:
        pixels, h, w = pack_image(path, side)
        stored, nbytes = Image.frombytes("RGB", (w, h), pixels), nbytes + len(pixels)
        for seed in range(seeds):
            with open_image(path) as img:
                width, height = img.size
                from_file = crop_pil(img, seed, views)
            sx, sy = w / width, h / height
            for k, view in enumerate(views):
                top, left, bh, bw = crop_box(seed, k, height, width, view)  # in the file's pixels
                cut = stored.resize((view[0], view[0]), Image.BICUBIC,
                                    box=(left * sx, top * sy, (left + bw) * sx, (top + bh) * sy))
                diff = TF.pil_to_tensor(cut).float() - from_file[k].float()
                sums[k][0] += diff.abs().sum().item()
                sums[k][1] += diff.square().sum().item()
                sums[k][2] += diff.numel()
    return [(a / n_, 10 * math.log10(255 ** 2 / max(sq / n_, 1e-12))) for a, sq, n_ in sums], nbytes / len(paths)


def stage_config(stage, cfg, tmp, data, root, tag=""):
    shared = dict(data=data, data_root=root, model=cfg.stage_model, img_size=cfg.stage_img_size,
                  patch_size=cfg.stage_patch, batch_size_per_gpu=cfg.stage_batch, epochs=cfg.stage_epochs,
                  warmup_epochs=0, subset=cfg.stage_subset, num_workers=cfg.num_workers, compile=cfg.compile,
                  out_dir=os.path.join(tmp, f"{stage}_{data}{tag}"))
    if stage == "mae":
        return pretrain_mae.Config(**shared)
    if stage == "finetune":  # fine-tuning's step without a checkpoint, with the paper's augmentation (ImageNet's)
        return finetune.Config(**shared, mode="scratch", mixup=0.2, randaug_magnitude=10, crop_min_scale=0.08)
    local = max(cfg.stage_patch, cfg.stage_img_size * 96 // 224 // cfg.stage_patch * cfg.stage_patch)
    return pretrain_contrastive.Config(**shared, method=stage, local_crop_size=local)


def run_stage(stage, stage_cfg):
    """img/s of the stage's last epoch."""
    STAGES[stage].main(stage_cfg)
    return read_log(stage_cfg.out_dir)[-1]["imgs_per_s"]


def worker_rate(stage, sc, dataset, n=64, rounds=3):
    """Files or a store: one worker core's img/s (files: read, decode; crop every view), the best of `rounds` passes
    over the same n images (a shared machine's other work only slows a pass down)."""
    dataset.views = STAGES[stage].views(sc)
    rates, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker (DataLoader sets it): a store's resize is torch's and would spread
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            dataset[(i % len(dataset), i)]
        rates.append(n / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return max(rates)


def time_data_path(stage, sc, dataset, classes, device):
    """(loading alone, + augmentation) img/s over a pass, after a warm-up pass that moves in-memory data to the
    device and starts the workers."""
    loader = Loader(dataset, sc.batch_size_per_gpu, True, sc.num_workers, device, STAGES[stage].views(sc))
    if stage == "mae":
        augment = lambda x, y: pretrain_mae.augment_batch(x)
    elif stage == "finetune":
        transform, mix = finetune.train_transform(sc), finetune.make_mixer(sc, classes)
        augment = lambda x, y: mix(transform(x), y) if mix else transform(x)
    else:
        augment = lambda x, y: pretrain_contrastive.make_views(x, sc)
    rates = []
    for run_augment in (False, False, True):
        sync(device)
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            if run_augment:
                augment(x, y)
            n += len(y)
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates[1], rates[2]


def measure_stage(stage, cfg, tmp, data, root, device, tag=""):
    """The rows of one stage on one source: end to end, loading alone, data path alone, one worker core."""
    sc = stage_config(stage, cfg, tmp, data, root, tag)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ips = run_stage(stage, sc)
    peak = round(peak_memory_mb(device))
    dataset, classes = build_dataset(sc.data, sc.data_root, True, sc.subset)  # once: a folder's listing
    load_ips, data_ips = time_data_path(stage, sc, dataset, classes, device)
    common = dict(device=device_name(device), model=cfg.stage_model, img_size=cfg.stage_img_size,
                  batch=cfg.stage_batch)
    share = ips / data_ips  # of an end-to-end step's time, if the data path ran alone
    rows = [dict(common, what=f"{stage} end to end ({data})", imgs_per_s=round(ips, 1), peak_mem_mb=peak),
            dict(common, what=f"{stage} loading alone ({data})", imgs_per_s=round(load_ips, 1)),
            dict(common, what=f"{stage} data path alone ({data})", imgs_per_s=round(data_ips, 1),
                 share_of_step=round(share, 3))]
    if isinstance(dataset, (FileImages, PackedImages)):
        per_core = worker_rate(stage, sc, dataset)
        rows.append(dict(common, what=f"{stage} one worker core ({data})", imgs_per_s=round(per_core, 1),
                         cores_to_feed_this_step=round(ips / per_core, 1)))
        print(f"{'':>24} {stage:>9}: one worker core {'reads, decodes' if data != 'packed' else 'reads'} and crops "
              f"{per_core:.0f} img/s ({data}); {ips / per_core:.2g} worker cores feed the {ips:.0f} img/s measured "
              "end to end", flush=True)
    print(f"{common['device']:>24} {stage:>9} {cfg.stage_model:>5} {cfg.stage_img_size}px batch {cfg.stage_batch} "
          f"({data}): end to end {ips:9.1f} img/s, peak memory {peak:7d} MB; loading alone {load_ips:9.1f}, "
          f"+ augmentation {data_ips:9.1f} img/s ({100 * share:.0f}% of a step's time)", flush=True)
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, step_fn, batch, img_size, steps, device, compile_):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fn = torch.compile(model) if compile_ else model
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(2 + steps):
        if i == 2:
            sync(device)
            t0 = time.perf_counter()
        with autocast_ctx(device):
            loss = step_fn(fn, imgs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0), peak_memory_mb(device)


def classify(model, imgs, labels):
    return F.cross_entropy(model(imgs).float(), labels)


def mae_step(model, imgs, labels):
    return model(imgs)[0]


def main(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results = []
    if cfg.make_jpegs:
        t0 = time.time()
        make_jpegs(cfg.data_root, cfg.make_jpegs)
        print(f"wrote {cfg.make_jpegs} JPEGs under {cfg.data_root}/val, each linked 10 times into train/ (an epoch "
              f"long enough to time), in {time.time() - t0:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        sources = [(cfg.data, cfg.data_root)]
        if cfg.pack:
            store = os.path.join(tmp, "store")
            rate = pack(cfg.data_root, store)
            cores = len(os.sched_getaffinity(0))
            results.append(dict(device=f"cpu x{cores}", what="pack (data/pack.py)", imgs_per_s=round(rate, 1),
                                per_core=round(rate / cores, 1)))
            print(f"packed {cfg.data_root} with data/pack.py: {rate:.0f} img/s on {cores} cores", flush=True)
            sources.append(("packed", store))
            for side in int_list(cfg.fidelity_sides, "--fidelity_sides"):
                (rrc, centre), per_image = fidelity(cfg.data_root, side)
                results.append(dict(what=f"store at {side} px against the files", bytes_per_image=round(per_image),
                                    rrc_mean_abs_diff=round(rrc[0], 2), rrc_psnr_db=round(rrc[1], 1),
                                    centre_mean_abs_diff=round(centre[0], 2), centre_psnr_db=round(centre[1], 1)))
                print(f"store at shorter side {side:4d} px ({per_image / 1e3:.0f} KB an image) against the files, the "
                      f"same boxes: RandomResizedCrop 224 (0.08-1) mean |diff| {rrc[0]:.2f} levels, PSNR "
                      f"{rrc[1]:.1f} dB; eval centre 224: {centre[0]:.2f} levels, {centre[1]:.1f} dB", flush=True)
        for stage in cfg.stage_list():
            pairs = []
            for pair in range(cfg.rounds if cfg.pack else 1):
                rows = {data: measure_stage(stage, cfg, tmp, data, root, device, f"_{pair}") for data, root in sources}
                results += [dict(r, round=pair + 1) if cfg.pack else r for source in rows.values() for r in source]
                if cfg.pack:  # the store against the files, measured side by side in this run
                    speed = {(data, r["what"].split(" (")[0]): r["imgs_per_s"] for data, rs in rows.items() for r in rs}
                    ratios = {what: speed[("packed", f"{stage} {what}")] / speed[(cfg.data, f"{stage} {what}")]
                              for what in ("one worker core", "end to end")}
                    results.append(dict(what=f"{stage} store / files", round=pair + 1,
                                        **{f"{k} ratio": round(v, 2) for k, v in ratios.items()}))
                    print(f"{'':>24} {stage:>9}: the store against the files: one worker core "
                          f"{ratios['one worker core']:.2f}x, end to end {ratios['end to end']:.2f}x", flush=True)
                    pairs.append(ratios)
            if len(pairs) > 1:  # a loaded machine moves single pairs by a third: the median says more
                median = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
                results.append(dict(what=f"{stage} store / files, median of {len(pairs)} pairs",
                                    **{f"{k} ratio": round(v, 2) for k, v in median.items()}))
                print(f"{'':>24} {stage:>9}: median of {len(pairs)} pairs: one worker core "
                      f"{median['one worker core']:.2f}x, end to end {median['end to end']:.2f}x (pairs: "
                      + ", ".join(f"{p['end to end']:.2f}x" for p in pairs) + ")", flush=True)
    batch = cfg.batch_size or (256 if device.type == "cuda" else 32)
    sizes = [(cfg.model, cfg.img_size, cfg.patch_size)] if cfg.model else [("cpu", 32, 4), ("tiny", 224, 16)]
    for size, img, patch in sizes if cfg.model_steps else []:
        vit = create_vit(size, cfg.num_heads, img_size=img, patch_size=patch).to(device)
        mae = MAE(MAEConfig(model=size, num_heads=cfg.num_heads, img_size=img, patch_size=patch)).to(device)
        runs = [("vit", vit, classify), ("mae", mae, mae_step)]
        try:
            import timm

            if size == "tiny" and img == 224:
                timm_tiny = timm.create_model("vit_tiny_patch16_224").to(device)
                runs.append(("timm vit_tiny_patch16_224", timm_tiny, classify))
        except ImportError:
            pass
        for name, model, fn in runs:
            ips, mem = time_steps(model, fn, batch, img, cfg.steps, device, cfg.compile)
            row = dict(device=device_name(device), model=size, what=f"{name} model step", img_size=img, batch=batch,
                       imgs_per_s=round(ips, 1), peak_mem_mb=round(mem))
            results.append(row)
            print(f"{row['device']:>24} {row['what']:>34} {size:>5} {img}px batch {batch}: {ips:9.1f} img/s, "
                  f"peak memory {mem:7.0f} MB", flush=True)
            stage = {"vit": "finetune", "mae": "mae"}.get(name)  # the stage whose loader feeds this step
            for worker in [r for r in results if r["what"] == f"{stage} one worker core ({cfg.data})"
                           and r["img_size"] == img]:
                row["worker_cores_to_feed"] = round(ips / worker["imgs_per_s"], 1)  # files at the model's speed
                print(f"{'':>24} {'':>34} files: {row['worker_cores_to_feed']} worker cores of "
                      f"{worker['imgs_per_s']:.0f} img/s each feed this step", flush=True)
    if cfg.out:
        write_text(cfg.out, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    cli(main, Config)
