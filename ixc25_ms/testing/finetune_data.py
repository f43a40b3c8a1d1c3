"""Look-alikes of the official finetune/data examples (drawn pictures) for training tests and benchmarks."""
from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw


def example_finetune_data(d) -> str:
    """Look-alikes of the official finetune/data examples (single image, multi-turn with two images, text only),
    with drawn pictures, and the data.txt of finetune.sh listing them with ratios."""
    d = str(d)
    os.makedirs(os.path.join(d, "data", "images"), exist_ok=True)
    for i, (size, col) in enumerate([((300, 200), (200, 40, 40)), ((160, 420), (40, 90, 200)), ((500, 260), (30, 160, 60))]):
        im = Image.new("RGB", size, (245, 242, 236))
        ImageDraw.Draw(im).ellipse((10, 10, size[0] // 2, size[1] // 2), fill=col)
        im.save(os.path.join(d, "data", "images", f"img{i}.png"))
    single = [{"id": i, "image": f"data/images/img{i % 3}.png", "conversations": [
        {"from": "human", "value": "What is in the picture?"},
        {"from": "bot", "value": ["A red disc.", "A blue disc.", "A green disc."][i % 3]}]} for i in range(6)]
    multi = [{"id": 0, "image": ["data/images/img0.png", "data/images/img1.png"], "conversations": [
        {"from": "human", "value": "Image1: <ImageHere>; Image2: <ImageHere>. Compare the colours."},
        {"from": "bot", "value": "The first disc is red, the second blue."},
        {"from": "human", "value": "Which is taller?"}, {"from": "bot", "value": "The second picture."}]}]
    text = [{"id": i, "conversations": [{"from": "human", "value": q}, {"from": "bot", "value": a}]}
            for i, (q, a) in enumerate([("Hello!", "Hi, how can I help?"), ("What can you do?", "I describe pictures."),
                                        ("Say yes.", "Yes.")])]
    for name, items in (("single_turn_single_image_example", single), ("multi_turn_multi_images_example", multi),
                        ("only_text_example", text)):
        with open(os.path.join(d, "data", name + ".json"), "w") as f:
            json.dump(items, f)
    with open(os.path.join(d, "data.txt"), "w") as f:
        f.write("data/only_text_example.json 1\ndata/single_turn_single_image_example.json 1\n"
                "data/multi_turn_multi_images_example.json 2\n")
    return d
