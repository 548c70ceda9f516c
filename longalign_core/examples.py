"""Built-in long prompts: the embedded default of the CLI and the benchmark workload."""

#: A 14-sentence, ~220-token (three 77-token chunks for ComfyUI) prompt of the kind LongAlign is for (dense, detailed captions).
EXAMPLE_PROMPT = (
    "A weathered stone lighthouse stands on a dark cliff above a grey sea at dusk. "
    "Huge waves crash against the rocks below, throwing white spray into the cold air. "
    "A keeper in a yellow raincoat climbs the iron stairs, carrying a brass lantern. "
    "White gulls circle the glass lamp room at the top of the tower. "
    "The sky fades from burning orange to deep violet, with the first stars. "
    "In the foreground, a red and blue rowing boat is tied to a rusted iron ring. "
    "Old fishing nets hang drying on a crooked fence beside lobster traps. "
    "A fat black cat with green eyes sleeps curled up on an upturned fish crate. "
    "An old fisherman with a white beard mends a torn net by lantern light. "
    "His scruffy brown terrier sits beside him and watches the dark water. "
    "Thin grey smoke rises from the chimney of a whitewashed cottage with a green door. "
    "A winding path of flat stones leads from the cottage up to the lighthouse gate. "
    "Tiny purple and yellow wildflowers grow between the stones and along the cliff edge. "
    "Far out at sea, the lights of a cargo ship blink through the mist."
)

#: The negative prompt used with it in the examples.
EXAMPLE_NEGATIVE = "blurry, low quality, distorted, watermark, text."
