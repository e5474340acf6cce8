"""Build the trainable LLM of a recipe: backbone -> objective set-up -> LoRA -> trainable regexes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from models import fast as fastpath
from models.lora import apply_lora, head_gets_trainable_tokens, set_trainable
from recipes.objectives.compose import ObjectiveSet


def prepare_llm(
    backbone: Callable,
    objectives: ObjectiveSet,
    lora: Mapping | None = None,
    trainable: Mapping | None = None,
    gradient_checkpointing: bool = False,
    kernels: str = "plain",
    fast: Mapping | None = None,
):
    """Return (llm, tokenizer) ready to train.

    Objectives set up before LoRA (MEAP adds `[MASK]` and its row stays trainable through peft's
    trainable tokens, on the LM head too when the head is tied to the embedding); the model is put in
    train mode because `from_pretrained` returns eval mode and Lightning keeps submodule modes as it finds
    them. `kernels=fast` applies models/fast.py around LoRA.
    """
    settings = fastpath.resolve_fast_path(kernels, fast)
    llm, tokenizer = backbone()
    extra_tokens = objectives.setup(llm, tokenizer)
    if settings is not None:
        needs_logits = any(getattr(o, "needs_logits", False) for o in objectives.objectives.values())
        head_trains = bool(extra_tokens) and head_gets_trainable_tokens(llm)
        fastpath.apply_before_lora(llm, settings, needs_logits, head_trains)
    if lora is not None:
        if settings is not None:
            lora = {**lora, "dropout": settings.lora_dropout}
        llm = apply_lora(llm, trainable_token_indices=extra_tokens, **lora)
    if trainable:
        set_trainable(llm, trainable.get("freeze", []), trainable.get("unfreeze", []))
    if settings is not None:
        fastpath.apply_after_lora(llm, settings)
    if gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(llm, "enable_input_require_grads"):
            llm.enable_input_require_grads()
    return llm.train(), tokenizer
