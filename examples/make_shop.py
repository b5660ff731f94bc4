"""Writes the small example shop the documentation's commands run on (``shop/clicks.csv``,
``shop/items.csv``): 300 users who each browse related products in order, so a model has something to
learn. Deterministic: run it again and the files are the same."""

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


def main(out: Path = Path(__file__).parent / "shop", users: int = 300, items: int = 48, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sku", "title", "brand_name", "category"])
        for i in range(1, items + 1):
            kind, cat = KINDS[i % len(KINDS)]
            name = f"{COLORS[(i - 1) % len(COLORS)]} {ANIMALS[(i - 1) // len(COLORS) % len(ANIMALS)]}"
            w.writerow([i, f"{BRANDS[i % len(BRANDS)]} {name} {kind}", BRANDS[i % len(BRANDS)], cat])
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
