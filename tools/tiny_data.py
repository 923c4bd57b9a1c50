"""The tiny world's data: the emoji class list, the sprite atlas, and augmented 32x32 renders.

    python -m tools.tiny_data atlas     # re-render assets/tiny_atlas.png and .json from the font
    python -m tools.tiny_data preview   # a grid of fresh renders of the 45 animals, to cache/

Only `atlas` needs the Noto Color Emoji font (apt-get install fonts-noto-color-emoji) and
fontTools: it renders every sprite once, deterministically, into one image that the repo ships.
Everything else here, and tiny.class_prompts(), reads the shipped atlas.

Shapes: B batch, N sprites, K classes, S sprite side (96).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tiny
from tiny import ANIMALS, IMAGE, class_prompts

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CACHE = ROOT / "cache"
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

SPRITE = 96  # S: sprites are rendered once at S x S (RGBA, premultiplied alpha)
ATLAS_COLUMNS = 20  # sprites per row of the atlas image

# ----------------------------------------------------------------------------------------------
# 1. The class list (from the font's character map)
# ----------------------------------------------------------------------------------------------


def _article(noun: str) -> str:
    """'a cat', 'an owl': the paper's "a(n) [animal]" prompt form (the captions of the classes)."""
    low = noun.lower()
    vowel = low[0] in "aeiou" and not low.startswith(("uni", "eu", "one", "use"))
    return ("an " if vowel else "a ") + noun


def prompt_for(name: str) -> str:
    return _article(name)


# Animals whose emoji goes by another name. goose (U+1FABF) is Unicode 15: the font draws it but
# Python 3.11's unicodedata has no name for it, so it is listed by code point.
ANIMAL_ALIASES = {
    "squirrel": [0x1F43F], "bee": [0x1F41D], "goose": [0x1FABF], "camel": [0x1F42A, 0x1F42B],
}  # fmt: skip

# Blocks of single-object pictographs (animals, plants, food, objects, vehicles, buildings).
_BLOCKS = [(0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF)]
# Name fragments that mark people, hands, faces, symbols, signs and near-duplicates: these are
# either not single objects or are indistinguishable at 32x32 (yellow smileys, arrows, hearts).
_EXCLUDE = (
    "FACE", "HAND", "FINGER", "FIST", "SIGN", "SYMBOL", "ARROW", "HEART", "FLAG", "BUTTON",
    "SQUARE", "CIRCLE", "DIAMOND", "TRIANGLE", "MOON", "KEYCAP", "LATIN", "INPUT", "PERSON", "MAN",
    "WOMAN", "BOY", "GIRL", "BABY", "FAMILY", "COUPLE", "KISS", "PEOPLE", "PREGNANT", "PRINCE",
    "ONCOMING", "CLOCK", "SPEAKER", "BRIGHTNESS", "LOCK", "MAGNIFYING", "BICYCLIST", "RUNNER",
    "SURFER", "SWIMMER", "LIFTER", "GOLFER", "SNOWBOARDER", "DANCER", "OFFICER", "WORKER",
    "GUARDSMAN", "SILHOUETTE", "BUST", "SELFIE", "SHRUG", "JUGGLING", "FENCER", "WRESTLERS",
    "WATER POLO", "HANDBALL", "CARTWHEEL", "HAIRCUT", "MASSAGE", "PEDESTRIAN", "HOLDING", "BRIDE",
    "ANGEL", "OGRE", "GOBLIN", "MERMAID", "FAIRY", "VAMPIRE", "ZOMBIE", "GENIE", "ELF", "MAGE",
    "SUPERHERO", "SUPERVILLAIN", "NINJA", "TROLL", "BEARDED", "CHILD", "ADULT", "OLDER", "BALLOON",
    "EYE", "EAR", "NOSE", "MOUTH", "TONGUE", "TOOTH", "BONE", "LEG", "FOOT", "BRAIN", "LUNGS",
    "ANATOMICAL", "WATER WAVE", "NO ", "SPOUTING", "PAW", "CARD INDEX", "CALENDAR", "CHART", "PAGE",
    "CLIPBOARD", "PUSHPIN", "PAPERCLIP", "LEDGER", "NOTEBOOK", "BOOKS", "DOCUMENT", "FILE", "LINK",
    "BOOKMARK", "SHOWER", "PLACE OF", "TOILET", "WATER CLOSET", "RESTROOM", "CUSTOMS", "BAGGAGE",
    "LUGGAGE", "PASSPORT", "DOTTED", "BUBBLES", "X-RAY", "BLOOD", "DNA", "MICROBE", "PETRI",
    "TEST TUBE", "SPARKLER", "FIREWORKS", "MILKY", "NIGHT", "DUSK", "SUNSET", "SUNRISE",
    "CITYSCAPE", "FOG", "RIBBON", "TICKETS", "LEVEL", "KNOBS", "FRAMES", "PERFORMING", "SCORE",
    "MUSICAL NOTE", "STATION", "TRAIN", "RAIL", "TRAM", "METRO", "MOTORWAY", "TRACK", "AIRPLANE ",
    "PLACARD", "IDENTIFICATION", "HEADSTONE", "TRADE", "ZZZ", "SLEEPING", "DASH", "DIZZY",
    "COLLISION", "SWEAT", "ANGER", "SPEECH", "THOUGHT", "HUNDRED", "MEDAL", "TROPHY",
    "CONSTRUCTION", "BUILDING", "OFFICE", "POST", "HOSPITAL", "BANK", "HOTEL", "STORE", "SCHOOL",
    "FACTORY", "IZAKAYA", "CASTLE", "WEDDING", "TOWER", "TEMPLE", "MOSQUE", "SYNAGOGUE", "KAABA",
    "CHURCH", "SHRINE", "STADIUM", "MENORAH", "OM ", "STAR OF", "WHEEL OF", "PEACE", "YIN",
    "ORTHODOX", "CROSS", "CRESCENT", "ATOM", "RADIOACTIVE", "BIOHAZARD", "BALLOT", "ENVELOPE",
    "E-MAIL", "INBOX", "OUTBOX", "PACKAGE", "MAILBOX", "POSTBOX", "HORN", "BEGINNER", "TRIDENT",
    "EMBLEM", "SIX POINTED", "CHEQUERED", "CROSSED", "DERELICT", "HOUSE BUILD", "JAPANESE",
    "TANABATA", "DOLLS", "CEREMONY", "STREAMER", "CHIME", "SATCHEL", "EMPTY", "EMOJI", "LAUGHING",
    "PALMS", "INDEX", "BICEPS", "VIBRATION", "ANTENNA", "HOLE", "COOKING",
)  # fmt: skip
# Animal emoji that look too much like one of the 45 to be a separate class at 32x32.
_CONFUSABLE = {
    "LEOPARD", "OX", "WATER BUFFALO", "RAM", "BOAR", "POODLE", "HAMSTER", "CHIPMUNK", "ROOSTER",
    "HATCHING CHICK", "BABY CHICK", "FRONT-FACING BABY CHICK", "LADY BEETLE", "BUG", "DRAGON",
    "CROCODILE", "T-REX", "SAUROPOD", "BISON", "MAMMOTH", "DODO", "SEAL", "ORANGUTAN", "GUIDE DOG",
    "SERVICE DOG", "BLACK CAT", "POLAR BEAR", "WORM", "COCKROACH", "CRICKET", "MOSQUITO", "BEAVER",
    "DONKEY", "MOOSE", "BLACK BIRD", "GOOSE",
}  # fmt: skip
NUM_OTHER_CLASSES = 255  # emoji classes beyond the 45 animals: 300 classes in all


@functools.lru_cache(maxsize=1)
def emoji_classes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The class list: ((caption, (code points...)), ...). The 45 animals first, in order.

    Each animal gets every emoji named after it (e.g. CAT and CAT FACE both draw "a cat"), so a
    prompt has more than one look. Other classes are single-code-point pictographs from the blocks
    above, filtered by name, taken evenly across the pool so every block is represented.
    The atlas ships this list (tiny.atlas_classes()); this function recomputes it from the font.
    """
    font_cps = _font_codepoints()
    by_name = {unicodedata.name(chr(c), ""): c for c in font_cps}
    classes: list[tuple[str, tuple[int, ...]]] = []
    used: set[int] = set()
    for animal in ANIMALS:
        up = animal.upper()
        cps = [by_name[n] for n in (up, up + " FACE") if n in by_name]
        cps += [c for c in ANIMAL_ALIASES.get(animal, []) if c in font_cps and c not in cps]
        if not cps:
            raise RuntimeError(f"no emoji for animal {animal!r} in {FONT_PATH}")
        classes.append((prompt_for(animal), tuple(cps)))
        used.update(cps)
    animal_names = {a.upper() for a in ANIMALS} | {a.upper() + " FACE" for a in ANIMALS}
    pool = []
    for c in sorted(font_cps):
        name = unicodedata.name(chr(c), "")
        if not name or c in used or name in animal_names or name in _CONFUSABLE:
            continue
        if not any(lo <= c <= hi for lo, hi in _BLOCKS) or any(x in name for x in _EXCLUDE):
            continue
        pool.append((prompt_for(name.lower()), (c,)))
    if len(pool) < NUM_OTHER_CLASSES:
        raise RuntimeError(
            f"only {len(pool)} other emoji found; the font at {FONT_PATH} looks incomplete"
        )
    pick = np.linspace(0, len(pool) - 1, NUM_OTHER_CLASSES).round().astype(int)
    classes += [pool[i] for i in pick]
    return tuple(classes)


# ----------------------------------------------------------------------------------------------
# 2. Sprites: rendered from the font into the atlas, read back from the atlas
# ----------------------------------------------------------------------------------------------


def _require_font() -> None:
    if not FONT_PATH.exists():
        raise FileNotFoundError(
            f"emoji font not found at {FONT_PATH}; only re-rendering the atlas needs it. "
            "Install it with: apt-get install fonts-noto-color-emoji (Debian/Ubuntu), "
            "or elsewhere put NotoColorEmoji.ttf from https://github.com/googlefonts/noto-emoji "
            "at that path"
        )


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int]:
    _require_font()
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        raise ImportError("re-rendering the atlas needs fontTools: pip install fonttools") from None

    return frozenset(c for c in TTFont(str(FONT_PATH)).getBestCmap() if c >= 0x1F300)


def _font_version() -> str:
    from fontTools.ttLib import TTFont

    return TTFont(str(FONT_PATH))["name"].getDebugName(5) or "?"


def _render_sprite(cp: int) -> np.ndarray:
    """One emoji as a (S, S, 4) premultiplied-RGBA float array, tight-cropped and centred."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_PATH), 109)  # the CBDT colour font has one bitmap size: 109
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), chr(cp), font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        raise RuntimeError(f"U+{cp:04X} renders empty")
    crop = canvas.crop(bbox)
    side = max(crop.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
    # resize in premultiplied alpha so transparent pixels' colours do not bleed into edges
    square = square.convert("RGBa").resize((SPRITE, SPRITE), Image.LANCZOS)
    return np.asarray(square, dtype=np.float32) / 255.0


ATLAS_NOTE = (
    "tiny_atlas.png holds every emoji sprite of the tiny world, written by "
    "`python -m tools.tiny_data atlas`: sprite i (classes in order, each class's code points in "
    "order) is the sprite x sprite tile at row i // columns, column i % columns. The pixels are "
    "premultiplied-alpha RGBA (colour already multiplied by coverage), stored as-is in an RGBA "
    "PNG: do not un-premultiply them. The images are a derived rendering of Google's Noto Emoji "
    "(Apache License 2.0, see LICENSE-emoji.md)."
)


def write_atlas(out: Path = ASSETS, columns: int = ATLAS_COLUMNS) -> tuple[Path, Path]:
    """Render every sprite from the font; write out/tiny_atlas.png and out/tiny_atlas.json.

    The PNG holds the sprites' premultiplied RGBA bytes unchanged (the renders are uint8 / 255,
    so nothing is lost); the JSON holds the layout and the class list. Returns both paths.
    """
    from PIL import Image
    from PIL import __version__ as pillow_version

    _require_font()  # before anything is written
    classes = emoji_classes()
    tiles = []
    for _, cps in classes:
        for cp in cps:
            sprite = _render_sprite(cp)  # (S, S, 4) float32
            tile = (sprite * 255).round().astype(np.uint8)
            if not np.array_equal(tile.astype(np.float32) / 255.0, sprite):
                raise RuntimeError(f"U+{cp:04X} does not render to whole uint8 levels")
            tiles.append(tile)
    rows = math.ceil(len(tiles) / columns)
    grid = np.zeros((rows * SPRITE, columns * SPRITE, 4), dtype=np.uint8)  # unused tiles: clear
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * SPRITE : (r + 1) * SPRITE, c * SPRITE : (c + 1) * SPRITE] = tile
    head = dict(note=ATLAS_NOTE, sprite=SPRITE, columns=columns, sprites=len(tiles),
                font=FONT_PATH.name, font_version=_font_version(), pillow=pillow_version)
    # one class per line: [caption, [code points...]]
    body = ",\n".join("  " + json.dumps([caption, list(cps)]) for caption, cps in classes)
    text = json.dumps(head, indent=1)[:-2] + ',\n "classes": [\n' + body + "\n ]\n}\n"
    assert json.loads(text)["classes"] == [[c, list(cps)] for c, cps in classes]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, meta = out / tiny.ATLAS_PNG.name, out / tiny.ATLAS_JSON.name
    Image.fromarray(grid).save(png, optimize=True)
    meta.write_text(text)
    return png, meta


def load_sprites() -> tuple[torch.Tensor, torch.Tensor]:
    """All sprites (N, 4, S, S) premultiplied RGBA in [0,1] and their class index (N,).

    Read from the shipped atlas (assets/tiny_atlas.png): no font needed. The values are the
    renders' uint8 levels / 255, bit for bit what _render_sprite returns (tests/test_tiny.py).
    """
    from PIL import Image

    if not tiny.ATLAS_PNG.exists():
        raise FileNotFoundError(
            f"emoji atlas not found at {tiny.ATLAS_PNG}; run `python -m tools.tiny_data atlas`"
        )
    meta = json.loads(tiny.ATLAS_JSON.read_text())
    side, columns = meta["sprite"], meta["columns"]
    labels = [k for k, (_, cps) in enumerate(tiny.atlas_classes()) for _ in cps]
    rows = math.ceil(len(labels) / columns)
    with Image.open(tiny.ATLAS_PNG) as im:
        if im.mode != "RGBA":
            raise ValueError(f"{tiny.ATLAS_PNG} is {im.mode}, not RGBA")
        grid = np.asarray(im)  # (rows S, columns S, 4) uint8
    if grid.shape != (rows * side, columns * side, 4):
        raise ValueError(f"{tiny.ATLAS_PNG} is {grid.shape[1]}x{grid.shape[0]}, but "
                         f"{tiny.ATLAS_JSON.name} describes {len(labels)} sprites of {side} px "
                         f"in {columns} columns")
    tiles = grid.reshape(rows, side, columns, side, 4).transpose(0, 2, 4, 1, 3)
    tiles = tiles.reshape(rows * columns, 4, side, side)[: len(labels)]  # (N, 4, S, S)
    sprites = np.ascontiguousarray(tiles).astype(np.float32) / 255.0
    return torch.from_numpy(sprites), torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# 3. Augmented 32x32 renders
# ----------------------------------------------------------------------------------------------


def augment(sprites: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Place each sprite at a random scale and position on a random flat background colour.

    sprites: (B, 4, S, S) premultiplied RGBA. Returns float (B, 3, 32, 32) in [0, 1].
    Compositing happens at 64x64 and is average-pooled to 32x32 (cheap anti-aliasing).
    """
    b = sprites.shape[0]
    scale = torch.empty(b).uniform_(0.55, 0.95, generator=generator)  # sprite side / image side
    room = 1.0 - scale  # how far the centre may move (in [-1, 1] image coordinates: room)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * room
    ty = (torch.rand(b, generator=generator) * 2 - 1) * room
    bg = torch.rand(b, 3, 1, 1, generator=generator)  # flat background colour
    # affine_grid maps output coords to input coords: input = (output - t) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -tx / scale, -ty / scale
    grid = F.affine_grid(theta, [b, 4, 2 * IMAGE, 2 * IMAGE], align_corners=False)
    fg = F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, alpha = fg[:, :3], fg[:, 3:]  # premultiplied colour, coverage
    out = rgb + (1 - alpha) * bg  # "over" compositing   (B, 3, 64, 64)
    return F.avg_pool2d(out, 2).clamp(0, 1)  # (B, 3, 32, 32)


def sample_batch(sprites, labels, batch_size: int, generator: torch.Generator,
                 animal_frac: float = 0.0):
    """A fresh batch: random sprites of random classes, augmented. Returns (images, class ids).

    With animal_frac = a, each row is an animal sprite with probability a (else any sprite): the
    45 animal prompts are what DDPO trains on, so pretraining may spend more of the small UNet on
    them.
    """
    idx = torch.randint(len(sprites), (batch_size,), generator=generator)
    if animal_frac > 0:
        animal = (labels < len(ANIMALS)).nonzero().flatten()  # animals are classes 0..44
        pick = animal[torch.randint(len(animal), (batch_size,), generator=generator)]
        idx = torch.where(torch.rand(batch_size, generator=generator) < animal_frac, pick, idx)
    return augment(sprites[idx], generator), labels[idx]


def render_prompt_images(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Fresh augmented renders of the emoji each prompt names: float (B, 3, 32, 32) in [0, 1]."""
    sprites, labels = load_sprites()
    index = {p: k for k, p in enumerate(class_prompts())}
    g = torch.Generator().manual_seed(seed)
    picks = []
    for p in prompts:
        if p not in index:
            raise ValueError(f"{p!r} is not a tiny-world class prompt")
        options = (labels == index[p]).nonzero().flatten()
        picks.append(options[torch.randint(len(options), (1,), generator=g)].item())
    return augment(sprites[picks], g)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _preview(path: Path, n_per_row: int = 15) -> None:
    from PIL import Image

    images = render_prompt_images(tiny.ANIMAL_PROMPTS, seed=0)
    grid = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, 32, 32, 3)
    rows = [np.concatenate(list(grid[i : i + n_per_row]), axis=1)
            for i in range(0, len(grid), n_per_row)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((n_per_row * 64, len(rows) * 64),
                                                         Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.tiny_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pa = sub.add_parser("atlas", help="re-render the sprite atlas and class list from the font")
    pa.add_argument("--out", type=Path, default=ASSETS, help="folder for tiny_atlas.png and .json")
    pp = sub.add_parser("preview", help="a grid of fresh renders of the 45 animals")
    pp.add_argument("--out", type=Path, default=CACHE / "animals_preview.png")
    args = p.parse_args(argv)
    try:
        if args.cmd == "atlas":
            png, meta = write_atlas(args.out)
            n = json.loads(meta.read_text())["sprites"]
            print(f"{len(emoji_classes())} classes, {n} sprites: wrote {png} "
                  f"({png.stat().st_size / 1e6:.2f} MB) and {meta}")
        else:
            sprites, _ = load_sprites()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            _preview(Path(args.out))
            print(f"{len(class_prompts())} classes, {len(sprites)} sprites; preview: {args.out}")
    except (FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
