"""What the workflows share: model file names, the commands their notes give, the example prompts."""

SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
LONGSD_STAGE1_LORA = "s28750_lora_vis.pt"
LONGSD_REWARD_LORA = "sd15-reward-3750.pt"
LONGSD_T5_FOLDER = "t5-large"
LONGSD_ADAPTER_FOLDER = "s28750_adapter"
DENSCORE_FOLDER = "Denscore"
#: The trainer's LoRA (``trainer/lora_layers.py`` names ``<output_dir>/longalign_lora.safetensors``), renamed by the
#: user so that it says which base model it belongs to.
TRAINER_LORA_FILE = "longalign_lora.safetensors"
SDXL_LORA = "longalign_sdxl_lora.safetensors"
SD15_LORA = "longalign_sd15_lora.safetensors"
#: The evaluation command the Read me note of lora_vs_base gives (many prompts and seeds, with intervals).
SD15_EVAL_COMMAND = (
    f"python -m trainer.evaluate --model /path/to/{SD15_CHECKPOINT} --reward-model /path/to/{DENSCORE_FOLDER} "
    f"--lora outputs/sd15/{TRAINER_LORA_FILE}"
)
#: The trainer command that makes SDXL_LORA (the Read me note of sdxl_longalign_lora and the README show it).
SDXL_TRAIN_COMMAND = (
    f"python -m trainer.finetune --model /path/to/{SDXL_CHECKPOINT} --reward-model /path/to/{DENSCORE_FOLDER} "
    "--resolution 1024 --output-dir outputs/sdxl"
)

#: A 13-sentence, 224-token prompt (three CLIP windows); with its 13 start tokens it fills 237 of the 240-token budget.
LONG_PROMPT = (
    "A cosy bookshop on a rainy evening, seen from the street through a tall arched window. "
    "Warm yellow light falls on wooden shelves that reach up to a dark green ceiling. "
    "A tall woman in a red wool coat reads a small blue book near the window. "
    "Beside her, a boy in a yellow raincoat kneels on the floor and stacks picture books into a tower. "
    "A grey tabby cat sleeps on a pile of old atlases on the counter. "
    "Behind the counter, an old bookseller with round glasses pours tea from a white porcelain pot. "
    "A brass bell hangs above the door, and a black umbrella drips in a tall ceramic stand. "
    "On the window sill stand three potted cacti and a glass jar full of pencils. "
    "Rain runs down the glass in thin streams, and the street lamps outside make orange circles on the wet "
    "cobblestones. "
    "A bicycle with a wicker basket full of tulips leans against the lamp post. "
    "A chalkboard sign by the door reads OPEN in white letters. "
    "The ceiling is strung with small paper lanterns in pink, teal and gold. "
    "Photograph, 35mm, shallow depth of field."
)
NEGATIVE_PROMPT = "blurry, low quality, deformed hands, watermark, text artefacts, oversaturated."

SDXL_PROMPT = (
    "An old harbour town on a steep hillside at golden hour, seen from a boat in the bay. "
    "Narrow houses painted ochre, coral and sky blue stand in uneven rows above the quay. "
    "A white lighthouse with a red lantern room rises at the end of a long stone pier. "
    "Fishing boats with blue hulls and orange buoys are moored along the harbour wall. "
    "A fisherman in yellow oilskins coils a thick rope on the deck of the nearest boat. "
    "Seagulls circle above a market stall piled with silver fish and lemons. "
    "Laundry hangs between two balconies, white sheets glowing in the low sun. "
    "A church bell tower with a green copper dome stands at the top of the hill. "
    "Long shadows stretch across the water, which reflects the coloured houses. "
    "Highly detailed, natural colours, cinematic lighting, 50mm lens."
)

#: The LoRA the training workflow writes (models/loras/<name>.safetensors) and the nodes' other defaults.
TRAINED_LORA_NAME = "longalign_lora"
#: Training prompts the training workflow ships with: examples of the kind, one per line, to be replaced by the
#: user's own (hundreds), or by a .txt / .jsonl file in ComfyUI's input/ chosen as prompts_file.
TRAINING_PROMPTS = LONG_PROMPT + "\n" + SDXL_PROMPT
