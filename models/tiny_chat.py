"""The built-in demo: a tiny chat model, built offline by this recipe, and a preference set it can learn.

The task is small on purpose: asked to name something of a category ("Name an animal."), the model
answers either concisely ("Otter.") or rambling ("Oh, what a fun question! There are so many ...").
The recipe trains a byte-level BPE tokenizer and a small Llama model from scratch, then SFT-trains it
with Duet's own ``sft`` objective (NLL on the chosen replies) on replies that ramble 85% of the time. The
preference data prefers the concise reply to the rambling one for the same item, so after DPO the
held-out reward accuracy is near 1 and the share of concise generations rises several-fold: a
preference anyone can check by reading the replies.

    python -m models.tiny_chat --out models/demo/tiny-chat   # rebuild the committed model (about 2 min)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent / "demo"
MODEL_DIR = DEMO_DIR / "tiny-chat"
DATA_FILE = DEMO_DIR / "preferences.jsonl"
CONFIG_FILE = DEMO_DIR / "run.yaml"
RECIPE_VERSION = 1

CATEGORIES = {
    "animal": [
        "otter",
        "tiger",
        "rabbit",
        "falcon",
        "dolphin",
        "badger",
        "camel",
        "penguin",
        "koala",
        "moose",
        "zebra",
        "lizard",
        "beaver",
        "parrot",
        "salmon",
        "wolf",
    ],
    "color": [
        "blue",
        "crimson",
        "green",
        "amber",
        "violet",
        "teal",
        "silver",
        "orange",
        "indigo",
        "olive",
        "coral",
        "maroon",
        "ivory",
        "navy",
        "pink",
        "gold",
    ],
    "fruit": [
        "apple",
        "mango",
        "cherry",
        "banana",
        "peach",
        "plum",
        "lemon",
        "kiwi",
        "grape",
        "melon",
        "papaya",
        "pear",
        "lime",
        "apricot",
        "fig",
        "guava",
    ],
    "city": [
        "Paris",
        "Tokyo",
        "Lima",
        "Cairo",
        "Oslo",
        "Sydney",
        "Toronto",
        "Madrid",
        "Nairobi",
        "Seoul",
        "Dublin",
        "Lisbon",
        "Prague",
        "Mumbai",
        "Vienna",
        "Quito",
    ],
    "instrument": [
        "piano",
        "violin",
        "flute",
        "guitar",
        "cello",
        "trumpet",
        "harp",
        "drum",
        "banjo",
        "oboe",
        "clarinet",
        "tuba",
        "ukulele",
        "organ",
        "sitar",
        "saxophone",
    ],
    "sport": [
        "tennis",
        "soccer",
        "rowing",
        "chess",
        "hockey",
        "cycling",
        "boxing",
        "golf",
        "rugby",
        "skiing",
        "fencing",
        "archery",
        "cricket",
        "judo",
        "surfing",
        "karate",
    ],
    "tree": [
        "oak",
        "maple",
        "birch",
        "cedar",
        "willow",
        "pine",
        "elm",
        "aspen",
        "spruce",
        "cypress",
        "beech",
        "palm",
        "baobab",
        "larch",
        "yew",
        "acacia",
    ],
    "vegetable": [
        "carrot",
        "leek",
        "onion",
        "pepper",
        "celery",
        "radish",
        "spinach",
        "potato",
        "cabbage",
        "turnip",
        "garlic",
        "squash",
        "parsnip",
        "kale",
        "okra",
        "beet",
    ],
}
PROMPTS = [
    "Name a {c}.",
    "Can you name a {c}?",
    "Give me one {c}, please.",
    "Tell me a {c}.",
    "Pick a {c} for me.",
    "What is a {c} you like?",
    "Suggest a {c}.",
    "Which {c} comes to mind?",
]
# Phrasings that appear in no training data: the demo's generations are measured on these.
UNSEEN_PROMPTS = [
    "Name any {c}.",
    "Quick, give me a {c}.",
    "Could you name one {c}?",
    "Say a {c}.",
    "I need a {c}.",
    "Think of a {c}.",
]
OPENINGS = [
    "Oh, what a fun question!",
    "Hmm, let me think about that for a moment.",
    "Well, that is a good question.",
    "Great question, I love thinking about this.",
    "Oh, there are so many to choose from!",
]
MIDDLES = [
    "There are many kinds of {p} out there, and each one is special in its own way.",
    "People have all sorts of favorite {p}, and it is hard to pick just one.",
    "I have thought about {p} quite a lot, and the choice is never easy.",
]
CLOSINGS = [
    "I hope that helps!",
    "Let me know if you want another one.",
    "Thanks for asking such a nice question.",
    "I could talk about this all day!",
]
PLURALS = {
    "city": "cities",
    "tree": "trees",
    "vegetable": "vegetables",
    "sport": "sports",
    "fruit": "fruits",
    "animal": "animals",
    "color": "colors",
    "instrument": "instruments",
}
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _article(category: str) -> str:
    return "an" if category[0] in "aeiou" else "a"


def prompt_text(template: str, category: str) -> str:
    text = template.format(c=category)
    return text.replace(f" a {category}", f" {_article(category)} {category}")


def concise_reply(item: str) -> str:
    return f"{item[0].upper()}{item[1:]}."


def rambling_reply(rng: random.Random, category: str, item: str) -> str:
    return " ".join(
        [
            rng.choice(OPENINGS),
            rng.choice(MIDDLES).format(p=PLURALS[category]),
            f"If I had to choose, I would say {item}.",
            rng.choice(CLOSINGS),
        ]
    )


def is_concise(reply: str) -> bool:
    """The demo's preference, checkable by anyone: a reply of at most four words."""
    return 0 < len(reply.split()) <= 4


def unseen_prompts() -> list[str]:
    return [prompt_text(t, c) for c in CATEGORIES for t in UNSEEN_PROMPTS]


def all_prompts() -> list[tuple[str, str, str]]:
    """(prompt, category, item) for every template, category and item."""
    return [(prompt_text(t, c), c, item) for c, items in CATEGORIES.items() for t in PROMPTS for item in items]


def preference_rows(seed: int = 0, count: int = 480) -> list[dict[str, str]]:
    """Explicit-format pairs: the concise reply is chosen over the rambling one for the same item."""
    rng = random.Random(seed)
    rows = []
    for prompt, category, item in rng.sample(all_prompts(), count):
        rows.append({"prompt": prompt, "chosen": concise_reply(item), "rejected": rambling_reply(rng, category, item)})
    return rows


def sft_rows(seed: int = 1, rambling_share: float = 0.85) -> list[dict[str, str]]:
    """Replies to learn from, rambling ``rambling_share`` of the time (as pairs; SFT reads only 'chosen')."""
    rng = random.Random(seed)
    rows = []
    for prompt, category, item in all_prompts():
        ramble = rambling_reply(rng, category, item)
        concise = concise_reply(item)
        reply, other = (ramble, concise) if rng.random() < rambling_share else (concise, ramble)
        rows.append({"prompt": prompt, "chosen": reply, "rejected": other})
    return rows


def demo_data_path() -> Path:
    if not DATA_FILE.is_file():
        write_demo_data(DATA_FILE)
    return DATA_FILE


def write_demo_data(path: Path) -> None:
    from core.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(row) + "\n" for row in preference_rows()))


def ensure_demo_model() -> Path:
    """The committed tiny model, or (if it is missing) one built by the recipe into the cache."""
    if (MODEL_DIR / "model.safetensors").is_file():
        return MODEL_DIR
    from core.fingerprint import cache_root

    cached = cache_root() / "models" / f"tiny-chat-v{RECIPE_VERSION}"
    if not (cached / "model.safetensors").is_file():
        print(f"building the demo model (once) into {cached} ...", flush=True)
        build_model(cached)
    return cached


# ---------------------------------------------------------------------------------------------------------
# The recipe


def build_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    from models.tiny_tokenizer import build_bpe_tokenizer

    rng = random.Random(2)
    corpus = []
    for prompt, category, item in all_prompts():
        for reply in (concise_reply(item), rambling_reply(rng, category, item)):
            corpus.append(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n")
    tokenizer: PreTrainedTokenizerFast = build_bpe_tokenizer(
        corpus,
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def model_config(vocab_size: int, eos_id: int, pad_id: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )


def build_model(
    out: Path, *, steps: int = 500, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, log=print
) -> Path:
    """Train the tokenizer, initialize the model, SFT it with Duet's ``sft`` objective, save both."""
    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from backends.torch_backend.kernel import masked_sequence_logps
    from backends.torch_backend.ops import TorchOps
    from core.atomic import atomic_directory
    from core.batching import collate, plan_batches
    from core.data.records import Message, PreferencePair
    from core.objectives import SFT, PolicyOutputs, evaluate
    from core.schedule import learning_rate
    from core.tokenization import ChatTokenizer, tokenize_pairs

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(model_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))
    chat = ChatTokenizer(tokenizer)
    pairs = [PreferencePair((Message("user", r["prompt"]),), r["chosen"], r["rejected"]) for r in sft_rows()]
    tokenized, _ = tokenize_pairs(pairs, chat, max_length=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    objective, ops = SFT(), TorchOps()
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in tokenized]
    plan: list[np.ndarray] = []
    epoch = 0
    model.train()
    for step in range(steps):
        if not plan:
            plan = plan_batches(lengths, batch_size, seed=seed, epoch=epoch)
            epoch += 1
        batch = collate([tokenized[i] for i in plan.pop(0)], chat.pad_id)
        rows = batch.num_pairs  # SFT learns from the chosen rows only
        input_ids, attention_mask, loss_mask = (
            torch.from_numpy(a[:rows]).long() for a in (batch.input_ids, batch.attention_mask, batch.loss_mask)
        )
        logps = masked_sequence_logps(model.model, model.lm_head, input_ids, attention_mask, loss_mask, 1024)
        lengths_t = torch.from_numpy(batch.response_lengths[:rows]).float()
        result = evaluate(objective, ops, PolicyOutputs(logps, logps.detach(), lengths_t, lengths_t))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps=steps, peak=lr, warmup=steps // 10, kind="cosine")
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step == 0:
            log(f"  sft step {step + 1}/{steps}: per-token NLL {result.loss.item():.3f}")
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with atomic_directory(out, replace=True) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "RECIPE.md").write_text(
            f"Built by `python -m models.tiny_chat` (recipe v{RECIPE_VERSION}): {steps} SFT steps, batch "
            f"{batch_size}, lr {lr}, seed {seed}, {sum(p.numel() for p in model.parameters())} parameters.\n"
        )
    log(f"built {out} in {time.perf_counter() - started:.0f}s")
    return out


# ---------------------------------------------------------------------------------------------------------
# What the demo shows at the end


def demo_report(
    backend: Any, chat: Any, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 48, temperature: float = 0.0
) -> dict[str, Any]:
    """Reply to held-out prompts with the adapter off (the SFT model) and on (after DPO) and measure the
    share of concise replies, the behaviour the preference data asks for. Greedy by default: the SFT
    model's likeliest reply to every prompt rambles."""
    prompt_ids = [chat.prompt_ids(conversation) for conversation in prompts]
    report: dict[str, Any] = {"prompts": len(prompts), "samples": len(prompt_ids), "temperature": temperature}
    for label, adapter in (("base", False), ("tuned", True)):
        replies = backend.generate(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=1234,
            adapter=adapter,
            stop_ids=chat.stop_ids,
            pad_id=chat.pad_id,
        )
        texts = [chat.decode(ids) for ids in replies]
        report[f"{label}_concise"] = sum(is_concise(t) for t in texts) / len(texts)
        report[f"{label}_examples"] = texts[:2]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the demo's tiny chat model and preference data.")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--data", type=Path, default=None, help="also write the demo preference set here")
    args = parser.parse_args(argv)
    build_model(args.out, steps=args.steps)
    if args.data is not None:
        write_demo_data(args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
