"""The training objectives: stage-1 distillation (and its sampled-softmax term), next-token prediction (speech or
text in), stage-2 behaviour distillation (KL), token accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that are not trained (Hugging Face convention)


def distill_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mse_weight: float = 1.0,
                 cosine_weight: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1: pred, target (B, N, d), mask (B, N) bool -> (loss, {"mse", "cosine"}).

    ``mse`` is the squared error summed over the hidden dimension and averaged over the real tokens;
    ``cosine`` the mean cosine similarity; loss = mse_weight * mse + cosine_weight * (1 - cosine).
    """
    m = mask.bool()
    n = m.sum().clamp(min=1)
    p, t = pred.float(), target.float()
    sq = (p - t).pow(2).sum(-1)  # (B, N)
    cos = F.cosine_similarity(p, t, dim=-1, eps=1e-8)  # (B, N)
    mse = (sq * m).sum() / n
    cosine = (cos * m).sum() / n
    loss = mse_weight * mse + cosine_weight * (1.0 - cosine)
    return loss, {"mse": mse.detach(), "cosine": cosine.detach()}


def sampled_softmax_loss(pred: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                         negatives: int = 4096, temperature: float = 0.05,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1's discriminative term: each vector must pick its own token's row of the embedding table.

    pred (B, N, d), table (V, d) (the LLM's input embeddings), token_ids / mask (B, N). The candidates are the
    batch's own tokens plus ``negatives`` rows drawn uniformly from the table (duplicates merged); the logits are
    cosine similarities divided by ``temperature``; the loss is the cross-entropy of the true row. Distillation
    alone (MSE + cosine) only pulls a vector towards its row; this term also pushes it away from the rows it could
    be mistaken for, which is what nearest-row accuracy (and the LLM reading the vector) needs.
    Returns (loss, {"sampled_acc": the fraction of vectors whose best candidate is their own row}).
    """
    m = mask.bool()
    q = F.normalize(pred[m].float(), dim=-1)  # (n, d)
    if q.shape[0] == 0:
        zero = pred.sum() * 0.0
        return zero, {"sampled_acc": zero.detach()}
    target = token_ids[m]
    drawn = torch.randint(0, table.shape[0], (negatives,), device=table.device, generator=generator)
    cand = torch.unique(torch.cat([target.to(table.device), drawn]))  # sorted, each row once
    rows = F.normalize(table[cand].float(), dim=-1).to(q.device)
    logits = q @ rows.T / temperature  # (n, C)
    want = torch.searchsorted(cand.to(q.device), target.to(q.device))
    loss = F.cross_entropy(logits, want)
    return loss, {"sampled_acc": (logits.detach().argmax(-1) == want).float().mean()}


def behaviour_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Stage 2's behaviour distillation: mean KL(teacher || student) of the next-token distributions.

    Both logits (B, S, V) come from the same LLM on sequences whose positions line up (the speech vectors, and the
    transcript's own embeddings); ``labels`` (B, S) mark, as in :func:`next_token_loss`, which positions predict a
    trained target (position p predicts ``labels[:, p + 1]``): only those count. The teacher is a target (no
    gradient). Scaled by temperature^2 so that its gradients keep their size when the temperature changes.
    """
    keep = labels[:, 1:] != IGNORE  # (B, S-1)
    if not bool(keep.any()):
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][keep].float() / temperature  # (n, V)
    t = teacher_logits[:, :-1][keep].detach().float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Shifted cross-entropy: logits (B, S, V) at position p predict ``labels[:, p + 1]``.

    ``labels`` (B, S) follow the HF convention (the token AT each position, IGNORE where not trained).
    Returns the mean over trained targets (nats) and their count.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    if n == 0:
        return shift_logits.sum() * 0.0, 0
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss / n, n


def ntp_labels(token_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) ids + mask -> (B, N) labels with IGNORE at padding."""
    return token_ids.masked_fill(~token_mask.bool(), IGNORE)


def speech_ntp_loss(llm_logits_fn, speech_embeds: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor,
                    prefix_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Speech in, text out: position i carries the vector of token i (B, N, d) and predicts token i+1.

    ``prefix_embeds`` (P, d) (e.g. the BOS embedding) is put in front as context; it predicts nothing,
    so the speech and the text loss (:func:`text_ntp_loss`) score exactly the same targets.
    ``llm_logits_fn(inputs_embeds (B, S, d), attention_mask (B, S)) -> logits (B, S, V)``.
    """
    inputs, attn, labels = speech_ntp_inputs(speech_embeds, token_ids, token_mask, prefix_embeds)
    logits = llm_logits_fn(inputs, attn)
    return next_token_loss(logits, labels)


def speech_ntp_inputs(speech_embeds: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor,
                      prefix_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequences :func:`speech_ntp_loss` scores: (inputs_embeds (B, P+N, d), attention_mask, labels)."""
    b = speech_embeds.shape[0]
    inputs, attn = speech_embeds, token_mask.long()
    labels = ntp_labels(token_ids, token_mask)
    if prefix_embeds is not None and prefix_embeds.shape[0] > 0:
        p = prefix_embeds.shape[0]
        inputs = torch.cat([prefix_embeds.to(inputs.dtype)[None].expand(b, p, -1), inputs], dim=1)
        attn = torch.cat([attn.new_ones(b, p), attn], dim=1)
        labels = torch.cat([labels.new_full((b, p), IGNORE), labels], dim=1)
        # The prefix's last position would predict token 0: not a speech-to-next-token target.
        labels[:, p] = IGNORE
    return inputs, attn, labels


def prefix_ntp_loss(llm_logits_fn, speech_embeds: torch.Tensor, speech_mask: torch.Tensor, token_ids: torch.Tensor,
                    token_mask: torch.Tensor, prefix_embeds: torch.Tensor | None = None,
                    embed_fn=None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Speech as a prefix, then the transcript: the objective of connectors without one vector per token.

    The baselines (stack, conv, Q-Former) give M vectors (B, M, d) that do not line up with the N transcript
    tokens, so each row becomes ``[prefix] [its real speech vectors] [its transcript's embeddings]`` (packed:
    no holes between the parts) and every transcript token is a target, token 0 predicted from the last speech
    vector. ``embed_fn`` maps ids to the LLM's input embeddings. Returns (loss over all N tokens, their count,
    loss over tokens 1..N-1: the targets :func:`speech_ntp_loss` and :func:`text_ntp_loss` score).
    """
    b, _n = token_ids.shape
    d = speech_embeds.shape[-1]
    parts = [speech_embeds, embed_fn(token_ids).to(speech_embeds.dtype)]
    masks = [speech_mask.bool(), token_mask.bool()]
    labels = [speech_mask.new_full(speech_mask.shape, IGNORE, dtype=torch.long), ntp_labels(token_ids, token_mask)]
    if prefix_embeds is not None and prefix_embeds.shape[0] > 0:
        p = prefix_embeds.shape[0]
        parts.insert(0, prefix_embeds.to(speech_embeds.dtype)[None].expand(b, p, d))
        masks.insert(0, speech_mask.new_ones(b, p, dtype=torch.bool))
        labels.insert(0, token_ids.new_full((b, p), IGNORE))
    inputs, mask, lab = torch.cat(parts, 1), torch.cat(masks, 1), torch.cat(labels, 1)
    # Pack each row: real positions first, in order (a stable sort on "is padding").
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    inputs = inputs.gather(1, order[..., None].expand(-1, -1, d))
    mask, lab = mask.gather(1, order), lab.gather(1, order)
    logits = llm_logits_fn(inputs, mask.long())
    loss, count = next_token_loss(logits, lab)
    # The same targets as the speech/text losses: drop each row's first transcript token.
    first = (lab != IGNORE).long().argmax(1)
    rest = lab.clone()
    rest[torch.arange(b, device=lab.device), first] = IGNORE
    with torch.no_grad():
        loss_rest, _ = next_token_loss(logits.detach(), rest)
    return loss, count, loss_rest


def text_ntp_loss(llm_logits_fn, embed_fn, token_ids: torch.Tensor, token_mask: torch.Tensor,
                  prefix_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The same LLM on the text itself: position i carries token i's own embedding; same targets as speech.

    Also the text-only LM loss of multitask training (``embed_fn`` = the LLM's embedding lookup).
    """
    embeds = embed_fn(token_ids)  # (B, N, d)
    return speech_ntp_loss(llm_logits_fn, embeds, token_ids, token_mask, prefix_embeds)


@torch.no_grad()
def nearest_token_accuracy(vectors: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor,
                           mask: torch.Tensor, chunk: int = 4096) -> tuple[int, int]:
    """(correct, total): how often the embedding-table row nearest (cosine) to each vector is its token.

    vectors (B, N, d), table (V, d), token_ids, mask (B, N). Chunked over tokens to bound memory.
    """
    m = mask.bool()
    q = F.normalize(vectors[m].float(), dim=-1)  # (n, d)
    if q.shape[0] == 0:
        return 0, 0
    t = F.normalize(table.float(), dim=-1)  # (V, d)
    pred = torch.cat([(q[i:i + chunk] @ t.T).argmax(-1) for i in range(0, q.shape[0], chunk)])
    return int((pred == token_ids[m]).sum()), int(q.shape[0])
