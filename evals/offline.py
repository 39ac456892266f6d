"""Reference-answer NLL computed offline with transformers + peft: the check on the live figure.

The same tokens as :func:`loraplane.evals.runner._reference_nll` (chat template, generation prompt,
answer content without the end-of-turn marker), scored by the base model with the adapter applied.
Heavy imports stay inside the function.
"""

from __future__ import annotations

import math
from pathlib import Path


def reference_nll_offline(
    base_model: Path, adapter: Path | None, chat: list[dict[str, str]], reference: str
) -> tuple[float, int]:
    """(summed NLL of the answer tokens, number of answer tokens), in float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    prompt_ids = list(
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    answered = [*chat, {"role": "assistant", "content": reference}]
    full_ids = list(
        tokenizer.apply_chat_template(answered, continue_final_message=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + answer")
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(full_ids[1:])
    token_lp = logprobs[torch.arange(len(targets)), targets]
    answer = token_lp[len(prompt_ids) - 1 :]
    return -math.fsum(float(x) for x in answer), len(answer)
