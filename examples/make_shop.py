"""Writes the small example shops the documentation's commands run on: ``shop/`` (English) and ``shop_zh/``
(Chinese titles, brands and categories, full-width punctuation), each ``clicks.csv`` + ``items.csv``: 300
users who each browse related products in order, so a model has something to learn. Deterministic: run it
again and the files are the same."""

import csv
import random
from pathlib import Path

BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"]
# every product has a name of its own (two words no other product has), as real catalogs mostly do
COLORS = ["crimson", "amber", "olive", "teal", "indigo", "violet", "ivory", "coral"]
ANIMALS = ["falcon", "otter", "lynx", "heron", "bison", "gecko"]
KINDS = [("running shoe", "sports"), ("rain jacket", "outdoor"), ("coffee grinder", "kitchen"),
         ("desk lamp", "home"), ("wireless earbuds", "electronics"), ("yoga mat", "sports"),
         ("tea kettle", "kitchen"), ("backpack", "outdoor")]


# the Chinese shop: the same walk over a catalogue of Chinese names (a colour and an animal each, as above)
BRANDS_ZH = ["小米", "华为", "李宁", "三只松鼠", "全聚德"]
COLORS_ZH = ["赤红", "琥珀", "橄榄", "青碧", "靛蓝", "紫罗兰", "象牙", "珊瑚"]
ANIMALS_ZH = ["猎鹰", "水獭", "山猫", "白鹭", "野牛", "壁虎"]
KINDS_ZH = [("跑鞋", "运动"), ("冲锋衣", "户外"), ("磨豆机", "厨房"), ("台灯", "家居"), ("无线耳机", "数码"),
            ("瑜伽垫", "运动"), ("烧水壶", "厨房"), ("双肩包", "户外")]


def _title(i: int, zh: bool) -> tuple[str, str, str]:
    """(title, brand, category) of product ``i``."""
    brands, colors, animals, kinds = ((BRANDS_ZH, COLORS_ZH, ANIMALS_ZH, KINDS_ZH) if zh else
                                      (BRANDS, COLORS, ANIMALS, KINDS))
    kind, cat = kinds[i % len(kinds)]
    brand, color, animal = brands[i % len(brands)], colors[(i - 1) % len(colors)], animals[(i - 1) // len(colors)
                                                                                           % len(animals)]
    if zh:
        return f"{brand}「{color}{animal}」{kind}（{i}号）", brand, f"{cat}，{kind}"
    return f"{brand} {color} {animal} {kind}", brand, cat


def main(out: Path = Path(__file__).parent / "shop", users: int = 300, items: int = 48, seed: int = 0,
         zh: bool = False) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sku", "title", "brand_name", "category"])
        for i in range(1, items + 1):
            w.writerow([i, *_title(i, zh)])
    with open(out / "clicks.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user", "sku", "ts"])
        for u in range(1, users + 1):
            cur = rng.randrange(items)
            for t in range(rng.randint(5, 9)):  # each user walks the catalog one step at a time
                w.writerow([f"u{u}", cur + 1, f"2024-03-{1 + t:02d}T{rng.randrange(24):02d}:00:00Z"])
                cur = (cur + 1) % items


if __name__ == "__main__":
    main()
    main(Path(__file__).parent / "shop_zh", zh=True)
