"""Segment ids: which part of the LLM input a position belongs to (AVSR diagnostics and loss masks).

Text recipes use PROMPT/TARGET only; AVSR fills all of them. PAD is 0 so `segments > 0` is the
attention mask.
"""

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
