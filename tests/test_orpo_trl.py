"""ORPO against TRL's ORPOTrainer (``trl.experimental.orpo``, TRL 1.16) as the oracle: the same model (the
demo's, whose LoRA starts at zero so the function is the base model's), the same tokenized batch (TRL's own:
its collator's input ids and labels become Duet's pairs), λ = β = 0.1.

What is compared, within 1e-4 (float32 log-probs summed over replies of ≤ 60 tokens: a few float32 roundings
of numbers of order 100):
- the average log-probs TRL computes (``logps/chosen``, ``logps/rejected``), the rewards, their margin and
  accuracy, ``log_odds_ratio`` and ``log_odds_chosen``;
- the odds-ratio part of the loss: TRL's loss minus its NLL term against Duet's loss minus its own.

Where the conventions differ, and why the NLL terms are not compared with each other: TRL's NLL is the
cross-entropy over every token of the chosen sequences, the prompt's included, as one token-weighted mean
over the batch; Duet follows the paper (eq. 2 and 6): each chosen reply's per-token NLL, the prompt excluded,
averaged over pairs. Duet's NLL is checked against that definition computed here from the model's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL (the oracle) is not installed: pip install -e '.[dev]'")

from backends.torch_backend.backend import TorchBackend  # noqa: E402
from backends.torch_backend.ops import TorchOps  # noqa: E402
from core.batching import collate  # noqa: E402
from core.config import LoraConfig, ObjectiveConfig  # noqa: E402
from core.objectives import PolicyOutputs, build_objective, evaluate  # noqa: E402
from core.tokenization import TokenizedPair  # noqa: E402
from models.tiny_chat import preference_rows  # noqa: E402
from tests.helpers import DEMO_MODEL  # noqa: E402

PAIRS = 6
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trl_side(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    rows = preference_rows(seed=3, count=PAIRS)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = ORPOConfig(
        output_dir=str(tmp_path_factory.mktemp("orpo")),
        per_device_train_batch_size=PAIRS,
        beta=0.1,
        max_length=128,
        report_to=[],
        use_cpu=True,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    model.eval()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(model, batch, train_eval="train")
    return batch, float(loss), {k: float(v) for k, v in metrics.items()}


def _reply(ids: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, reply ids) of one TRL row: the labels are -100 over the prompt and the padding."""
    first = int(torch.nonzero(labels != -100)[0])
    return ids[:first].numpy(), ids[labels != -100].numpy()


def duet_side(batch) -> tuple[dict[str, float], float, np.ndarray, list[TokenizedPair], TorchBackend]:
    backend = TorchBackend(device="cpu", dtype="float32")
    backend.load_model(str(DEMO_MODEL))
    backend.seed(0)
    backend.attach_lora(LoraConfig(rank=4, alpha=8))  # B = 0: the base model's function
    pairs = []
    for i in range(PAIRS):
        chosen_mask = batch["chosen_attention_mask"][i].bool()
        rejected_mask = batch["rejected_attention_mask"][i].bool()
        prompt, chosen = _reply(batch["chosen_input_ids"][i][chosen_mask], batch["chosen_labels"][i][chosen_mask])
        prompt_r, rejected = _reply(
            batch["rejected_input_ids"][i][rejected_mask], batch["rejected_labels"][i][rejected_mask]
        )
        assert np.array_equal(prompt, prompt_r)
        pairs.append(TokenizedPair(i, prompt.astype(np.int32), chosen.astype(np.int32), rejected.astype(np.int32)))
    duet_batch = collate(pairs, backend.tokenizer.pad_token_id or 0)
    logps = torch.from_numpy(backend.sequence_logps(duet_batch)).to(torch.float64)
    lengths = torch.from_numpy(duet_batch.response_lengths.astype(np.float64))
    objective = build_objective(ObjectiveConfig(name="orpo", beta=0.1))
    result = evaluate(objective, TorchOps(), PolicyOutputs.from_rows(logps, lengths, None))
    metrics = {k: float(v) for k, v in result.metrics.items()}
    return metrics, float(result.loss), logps.numpy(), pairs, backend


def test_orpo_equals_trls_orpo_trainer_on_the_same_batch(trl_side) -> None:
    batch, trl_loss, trl_metrics = trl_side
    metrics, loss, _, _, _ = duet_side(batch)
    for key in (
        "logps/chosen",
        "logps/rejected",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "log_odds_ratio",
        "log_odds_chosen",
    ):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=TOLERANCE, rel=TOLERANCE), key
    # the odds-ratio part: TRL's loss is nll − β·mean(log σ(log odds)); Duet's, its nll + the same term
    trl_odds_part = trl_loss - trl_metrics["nll_loss"]
    duet_odds_part = loss - metrics["nll_loss"]
    assert duet_odds_part == pytest.approx(trl_odds_part, abs=TOLERANCE)
    assert duet_odds_part == pytest.approx(-0.1 * trl_metrics["log_odds_ratio"], abs=TOLERANCE)


def test_orpos_nll_is_the_papers_per_reply_nll(trl_side) -> None:
    """Duet's NLL term from an independent full-logits computation: each chosen reply's mean token NLL (the
    prompt excluded), averaged over pairs; TRL's, over prompt and reply tokens of the batch, is larger here."""
    batch, _, trl_metrics = trl_side
    metrics, _, _, pairs, backend = duet_side(batch)
    model = backend.model
    per_reply = []
    with torch.no_grad():
        for pair in pairs:
            ids = torch.tensor(np.concatenate([pair.prompt_ids, pair.chosen_ids]), dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0].double()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = ids[0, 1:]
            token = logprobs[torch.arange(len(targets)), targets][len(pair.prompt_ids) - 1 :]
            per_reply.append(-float(token.mean()))
    assert metrics["nll_loss"] == pytest.approx(np.mean(per_reply), rel=1e-5)
    assert trl_metrics["nll_loss"] != pytest.approx(metrics["nll_loss"], rel=1e-2)  # the conventions differ
