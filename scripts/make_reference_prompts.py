"""Write longalign_core/data/reference_prompts.txt: the default prompt set for the common text direction V.

Deterministic (seeded) combinations of varied subjects, settings, details, light and styles, 4–7 sentences
each, in the style of the long captions LongAlign is trained on. Run: python scripts/make_reference_prompts.py
"""

import random
from pathlib import Path

SUBJECTS = [
    "an elderly woman with silver hair", "a young boy in a striped shirt", "a red fox", "a vintage blue bicycle",
    "a golden retriever", "a steaming cup of coffee", "a knight in dented armour", "a tabby cat",
    "a lighthouse keeper", "a robot with copper plating", "a street violinist", "a bowl of ramen",
    "a sailing boat", "a grey heron", "a market stall full of oranges", "a chef in a white apron",
    "an old steam locomotive", "a snow leopard", "a pair of worn leather boots", "a ballerina",
    "a wooden treehouse", "a hot air balloon", "a beekeeper", "a stack of old books", "a small green frog",
    "a desert caravan of camels", "a child flying a kite", "a blacksmith at an anvil", "a sleeping panda",
    "a neon-lit food truck", "a marble statue of a horse", "a glass terrarium", "a fisherman in a yellow coat",
    "a vase of sunflowers", "a skateboarder", "a family of ducks", "an astronaut", "a clockmaker",
    "a bonsai tree", "a jazz band",
]
SETTINGS = [
    "in a misty pine forest", "on a crowded city street", "inside a cosy kitchen", "on a windswept beach",
    "in a snowy mountain village", "beside a calm lake", "in an abandoned factory", "on a rooftop garden",
    "in a busy train station", "in a sunlit library", "in a field of lavender", "under a stone bridge",
    "on the deck of a ship", "in a tropical rainforest", "in a quiet temple courtyard", "at a night market",
    "in a desert canyon", "inside a glass greenhouse", "on a frozen river", "in a medieval castle hall",
]
DETAILS = [
    "A wooden bench with peeling paint stands nearby.", "Puddles on the ground reflect the sky.",
    "A flock of birds crosses the background.", "Paper lanterns hang from a string overhead.",
    "A red umbrella leans against a wall.", "Fallen leaves cover the path in orange and brown.",
    "A small dog watches from a doorway.", "Steam rises from a grate in the ground.",
    "Ivy climbs the walls of an old building.", "A chalkboard sign lists prices in neat handwriting.",
    "A bicycle is chained to a lamp post.", "Wildflowers grow between the stones.",
    "A row of potted herbs sits on the window sill.", "Distant mountains are capped with snow.",
    "A clock tower shows a quarter past four.", "Two children run past laughing.",
    "A striped awning shades the entrance.", "Smoke curls from a chimney.",
    "A wooden crate is full of ripe apples.", "A cat sleeps on a warm stone step.",
    "An old map is pinned to the wall.", "Candles flicker on a long table.",
    "A rope swing hangs from a thick branch.", "Fishing nets are spread out to dry.",
]
LIGHT = [
    "The scene is lit by warm golden-hour sunlight.", "Soft overcast light gives gentle shadows.",
    "Harsh midday sun casts short, sharp shadows.", "Blue twilight fills the sky.",
    "Neon signs throw pink and cyan light across everything.", "Morning fog softens the background.",
    "Moonlight gives the scene a cold silver tone.", "Rays of light fall through the clouds.",
]
STYLES = [
    "Photorealistic, 35 mm photograph, shallow depth of field.", "Watercolour painting with loose brushstrokes.",
    "Oil painting in the style of the Dutch masters.", "Highly detailed digital illustration.",
    "Black and white film photograph with visible grain.", "Studio Ghibli inspired anime style.",
    "Wide-angle shot from a low viewpoint.", "Close-up shot with a blurred background.",
    "Isometric 3D render with soft shadows.", "Vintage postcard with faded colours.",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "white", "black", "orange", "teal", "brown"]


def make(rng: random.Random) -> str:
    subject, setting = rng.choice(SUBJECTS), rng.choice(SETTINGS)
    colour = rng.choice(COLOURS)
    sentences = [f"{subject[0].upper()}{subject[1:]} {setting}.",
                 f"The main colour of the scene is {colour}, with accents of {rng.choice(COLOURS)}."]
    sentences += rng.sample(DETAILS, rng.randint(1, 3))
    sentences.append(rng.choice(LIGHT))
    if rng.random() < 0.8:
        sentences.append(rng.choice(STYLES))
    return " ".join(sentences)


def main() -> None:
    rng = random.Random(2410_11817)
    prompts: list[str] = []
    while len(prompts) < 300:
        p = make(rng)
        if p not in prompts:
            prompts.append(p)
    out = Path(__file__).resolve().parents[1] / "longalign_core" / "data" / "reference_prompts.txt"
    out.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main()
