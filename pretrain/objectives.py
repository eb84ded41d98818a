"""Pretraining objectives: NTP for causal backbones, MLM for BERT and ModernBERT, permutation LM (PLM) for XLNet,
and the auxiliary-loss extension point.

Loss masking. The collator sets ``labels = input_ids`` with -100 on padding. NTP shifts inside the model and
drops targets that cross a document boundary of a packed row (``models.common.next_token_loss``); MLM and PLM
keep labels only at their targets (PLM's logits are aligned with the targets like MLM's). ``target_count`` counts exactly the targets each loss averages over, so
validation can sum token losses over ranks and batches.

Auxiliary losses are callables ``(hidden_states (B, L, H), batch) -> (loss scalar, {name: scalar})`` added
to the objective's loss; the last hidden states come from a forward hook on the base model, so no second
forward runs and the hook works inside any parallel wrapper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data_shards.schema import PAD_ID, SPECIAL_TYPES, TokenType
from ..seeding import derive_seed
from .models import OBJECTIVES
from .models.common import IGNORE_INDEX
from .models.masking import document_starts, resolve_document_ids

AuxLoss = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def maskable_positions(batch: dict) -> torch.Tensor:
    """(B, L) bool: real clinical tokens (never padding, never [CLS]/[VS]/[VE]/[REG]/interval/task tokens)."""
    ok = batch["attention_mask"].bool() & (batch["input_ids"] != PAD_ID)
    if "type_ids" in batch:
        types = batch["type_ids"]
        for special in (TokenType.PAD, *SPECIAL_TYPES):
            ok &= types != special
    return ok


def mlm_mask(
    batch: dict, *, probability: float, mask_token_id: int, vocab_size: int, first_code_id: int, seed: int
) -> dict:
    """BERT masking (80% [MASK], 10% a random code, 10% unchanged) of ``probability`` of the maskable tokens.

    Deterministic in ``seed`` (derive it from run seed, step, rank, micro-step), so resuming reproduces it
    without RNG state. Random replacements are drawn from clinical codes ids [first_code_id, vocab_size).
    Returns a new batch: input_ids (B, L) masked, labels (B, L) original ids at masked positions else -100.
    """
    input_ids = batch["input_ids"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = input_ids.shape
    selected = (torch.rand(shape, generator=gen) < probability).to(input_ids.device) & maskable_positions(batch)
    action = torch.rand(shape, generator=gen).to(input_ids.device)
    random_ids = torch.randint(first_code_id, vocab_size, shape, generator=gen).to(input_ids.device)
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = mask_token_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_ids[swap]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[selected] = input_ids[selected]
    return {**batch, "input_ids": masked, "labels": labels}


def plm_inputs(batch: dict, *, probability: float, seed: int) -> dict:
    """XLNet's permutation LM: ``probability`` of the maskable tokens become targets (never a document's first
    token, so every target sees at least one token of its own document), predicted in a random factorization
    order from the other (context) tokens and the targets before them. Inputs stay unchanged (no [MASK]).

    Deterministic in ``seed`` like ``mlm_mask``. Returns a new batch with labels (B, L) (the ids at targets,
    else -100) and plm_rank (B, L) float (each target's order key in [0, 1), smaller = earlier; -1 for context
    tokens), which the XLNet model turns into its permutation mask (``masking.plm_perm_mask``).
    """
    input_ids = batch["input_ids"]
    shape, device = input_ids.shape, input_ids.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    drawn = (torch.rand(shape, generator=gen) < probability).to(device)
    order = torch.rand(shape, generator=gen).to(device)
    documents = resolve_document_ids(batch.get("document_ids"), batch.get("attention_mask"), shape, device)
    starts = document_starts(documents)
    starts[:, 0] = True
    targets = drawn & maskable_positions(batch) & ~starts
    labels = input_ids.masked_fill(~targets, IGNORE_INDEX)
    return {**batch, "labels": labels, "plm_rank": torch.where(targets, order, -1.0)}


def target_mask(batch: dict, causal: bool) -> torch.Tensor:
    """Bool mask of the targets the model's mean loss is taken over, aligned with the target tokens:
    causal (B, L-1), True at t where token t+1 is a target of position t; MLM (B, L), the masked positions."""
    labels = batch["labels"]
    if not causal:
        return labels != IGNORE_INDEX
    valid = labels[:, 1:] != IGNORE_INDEX
    if batch.get("document_ids") is not None:
        doc = batch["document_ids"]
        valid &= ~document_starts(doc)[:, 1:] & (doc[:, 1:] != 0)
    return valid


def target_count(batch: dict, causal: bool) -> torch.Tensor:
    """Number of targets the model's mean loss is taken over (0-dim long tensor)."""
    return target_mask(batch, causal).sum()


def is_code_type(type_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of clinical-code tokens (types DX..OTHER, value bins included: they carry their code's type),
    the targets of the ``codes`` reference perplexity (``data_shards.reference_ppl``)."""
    special = torch.tensor(sorted({int(TokenType.PAD), *(int(t) for t in SPECIAL_TYPES)}), device=type_ids.device)
    return ~torch.isin(type_ids, special)


def loss_sums(logits: torch.Tensor, batch: dict, causal: bool) -> torch.Tensor:
    """(4,) float64 [summed target NLL, targets, summed NLL over clinical-code targets, code targets] of one
    batch; logits (B, L, V) in nats. The first two give the model's mean loss (sum / targets, the quantity
    ``target_count`` normalises), the last two the perplexity on clinical codes alone."""
    mask = target_mask(batch, causal)
    if causal:
        logits, targets, types = logits[:, :-1], batch["labels"][:, 1:], batch.get("type_ids")
        types = types[:, 1:] if types is not None else None
    else:
        targets, types = batch["labels"], batch.get("type_ids")
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0), reduction="none"
    ).view(mask.shape)
    codes = mask & is_code_type(types) if types is not None else mask
    nll = nll.double()
    return torch.stack([nll[mask].sum(), mask.sum().double(), nll[codes].sum(), codes.sum().double()])


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone inside a head model (``model`` / ``backbone`` / ``bert``), whose output holds the last
    hidden states (B, L, H)."""
    return model.base_model


class Objective:
    """Turns a stream batch into (loss, logs) with one forward of the (possibly wrapped) model.

    ``head`` is the unwrapped HF head model (for the hidden-state hook); ``aux_losses`` are added to the loss.
    """

    def __init__(
        self,
        architecture: str,
        head: torch.nn.Module,
        *,
        seed: int,
        rank: int,
        mlm_probability: float = 0.15,
        plm_probability: float = 1 / 6,
        mask_token_id: int = 2,
        first_code_id: int = 1,
        aux_losses: dict[str, AuxLoss] | None = None,
    ) -> None:
        self.kind = OBJECTIVES[architecture]
        self.causal = self.kind == "ntp"
        self.seed, self.rank = seed, rank
        self.mlm_probability, self.plm_probability = mlm_probability, plm_probability
        self.mask_token_id, self.first_code_id = mask_token_id, first_code_id
        self.vocab_size = head.config.vocab_size
        self.aux_losses = dict(aux_losses or {})
        # CEHR-BERT: visit-type prediction beside MLM, when the vocabulary has visit-type codes
        type_ids = list(getattr(head.config, "visit_type_token_ids", None) or [])
        self.visit_type_ids = torch.tensor(type_ids, dtype=torch.long) if type_ids else None
        if self.visit_type_ids is not None:
            self.aux_losses["visit_type"] = visit_type_aux(head)
        self._hidden: torch.Tensor | None = None
        if self.aux_losses:
            base_model(head).register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._hidden = output.last_hidden_state

    def prepare(self, batch: dict, step: int, micro: int, device: torch.device, split: str = "train") -> dict:
        """Move to device; apply MLM masking or draw the PLM targets and order (seeded by step / rank /
        micro-step / split)."""
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if self.kind == "plm":
            batch = plm_inputs(
                batch,
                probability=self.plm_probability,
                seed=derive_seed(self.seed, "plm", split, step, self.rank, micro),
            )
        elif self.kind == "mlm":
            batch = mlm_mask(
                batch,
                probability=self.mlm_probability,
                mask_token_id=self.mask_token_id,
                vocab_size=self.vocab_size,
                first_code_id=self.first_code_id,
                seed=derive_seed(self.seed, "mlm", split, step, self.rank, micro),
            )
        if self.visit_type_ids is not None:
            batch = visit_type_mask(
                batch,
                self.visit_type_ids,
                probability=self.mlm_probability,
                mask_token_id=self.mask_token_id,
                seed=derive_seed(self.seed, "visit_type", split, step, self.rank, micro),
            )
        return batch

    def __call__(self, model: torch.nn.Module, batch: dict, with_aux: bool = True) -> tuple[torch.Tensor, dict]:
        """loss (0-dim, fp32, objective + auxiliary terms) and detached logs {"loss/objective", "aux/..."}."""
        self._hidden = None
        out = model(**batch)
        loss = out.loss.float()
        logs = {"loss/objective": loss.detach()}
        if with_aux and self.aux_losses:
            if self._hidden is None:
                raise RuntimeError("auxiliary losses need the base model's hidden states; the hook did not fire")
            for name, aux in self.aux_losses.items():
                value, terms = aux(self._hidden, batch)
                loss = loss + value.float()
                logs[f"aux/{name}"] = value.detach().float()
                logs.update({k: v.detach().float() for k, v in terms.items()})
        self._hidden = None
        return loss, logs

    def validation_sums(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """``loss_sums`` of one forward without auxiliary losses: (4,) float64 on the batch's device."""
        return loss_sums(model(**batch).logits, batch, self.causal)


# vocabulary prefixes of visit-type codes, the classes of CEHR-BERT's visit-type prediction (FHIR Encounter.class)
VISIT_TYPE_PREFIXES = ("ENCOUNTER/", "VISIT/")


def visit_type_token_ids(tokens: list[str], prefixes: tuple[str, ...] = VISIT_TYPE_PREFIXES) -> list[int]:
    """Ids (positions in the vocabulary ``tokens``) of the visit-type codes."""
    return [i for i, token in enumerate(tokens) if token.startswith(prefixes)]


def visit_type_mask(
    batch: dict, visit_type_ids: torch.Tensor, *, probability: float, mask_token_id: int, seed: int
) -> dict:
    """CEHR-BERT's visit-type masking on an MLM-masked batch (``models.cehrbert``): each visit-type token is
    selected with ``probability``; a selected one becomes [MASK] and leaves the MLM targets, and every clinical
    token of its visit (same document and visit order, the visit-type token included) gets the visit type as
    target. ``batch["input_ids"]`` may already be MLM-masked: visit-type tokens are found in the original ids
    (MLM labels where set). Returns a new batch with visit_type_labels (B, L): index into visit_type_ids, or
    -100. No host sync."""
    labels = batch["labels"]
    original = torch.where(labels != IGNORE_INDEX, labels, batch["input_ids"])
    ids = visit_type_ids.to(original.device)
    is_type = torch.isin(original, ids) & batch["attention_mask"].bool()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    selected = is_type & (torch.rand(original.shape, generator=gen) < probability).to(original.device)
    # visits as runs of equal (document, visit order) along a row
    documents = batch.get("document_ids")
    documents = documents if documents is not None else batch["attention_mask"].long()
    orders = batch["visit_orders"]
    change = torch.zeros_like(selected)
    change[:, 1:] = (documents[:, 1:] != documents[:, :-1]) | (orders[:, 1:] != orders[:, :-1])
    run = change.long().cumsum(1)  # (B, L) visit index within the row
    cls = (original[..., None] == ids).long().argmax(-1)  # class of a visit-type token
    # class + 1 of the selected visit-type token of each run (0 = none selected)
    per_run = torch.zeros_like(run).scatter_reduce(1, run, torch.where(selected, cls + 1, 0), reduce="amax")
    target = per_run.gather(1, run) - 1
    is_event = is_code_type(batch["type_ids"]) if "type_ids" in batch else batch["attention_mask"].bool()
    target = torch.where((target >= 0) & is_event & (orders > 0), target, IGNORE_INDEX)
    return {
        **batch,
        "input_ids": batch["input_ids"].masked_fill(selected, mask_token_id),
        "labels": labels.masked_fill(selected, IGNORE_INDEX),
        "visit_type_labels": target,
    }


def visit_type_aux(head: torch.nn.Module) -> AuxLoss:
    """CEHR-BERT's visit-type prediction loss as an auxiliary loss: the model's forward computes it from the
    batch's visit_type_labels (inside the wrapped forward, so FSDP / DeepSpeed see the head's parameters); a
    hook on ``head`` hands it over. Weighted by ``config.visit_type_loss_weight``."""
    captured: dict = {}
    head.register_forward_hook(lambda module, args, out: captured.update(loss=out.visit_type_loss))
    weight = float(head.config.visit_type_loss_weight)

    def aux(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = captured.pop("loss", None)
        if loss is None:
            raise RuntimeError("visit-type loss missing: the batch had no visit_type_labels")
        return weight * loss, {"visit_type/targets": (batch["visit_type_labels"] != IGNORE_INDEX).sum().float()}

    return aux


def dense_aux(cfg, group=None) -> AuxLoss:
    """The dense-feature loss (``dense_loss.dense_aux_loss``) as an auxiliary loss."""
    from .dense_loss import dense_aux_loss

    def aux(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        return dense_aux_loss(
            hidden,
            cfg,
            attention_mask=batch["attention_mask"],
            document_ids=batch.get("document_ids"),
            type_ids=batch.get("type_ids"),
            group=group,
        )

    return aux
