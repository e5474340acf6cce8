"""Layout conventions of an LLM input shared by data, losses, models, recipes and diagnostics.

Segment ids say which part of the input a position belongs to (AVSR diagnostics and loss masks). Text
recipes use PROMPT/TARGET only; AVSR fills all of them. PAD is 0 so `segments > 0` is the attention mask.

IGNORE_INDEX is the label of a position with no target (HF convention; `torch.nn.functional.cross_entropy`'s
default `ignore_index`): prompt, modality tokens and padding.
"""

IGNORE_INDEX = -100

PAD, BOS, AUDIO, VIDEO, PROMPT, TARGET, DELIMITER = 0, 1, 2, 3, 4, 5, 6
NAMES = {
    PAD: "pad",
    BOS: "bos",
    AUDIO: "audio",
    VIDEO: "video",
    PROMPT: "prompt",
    TARGET: "target",
    DELIMITER: "delimiter",
}
