"""The PRADA model: any causal LM (a local Hugging Face directory, or a preset) with K
learned soft-prompt vectors before the input embeddings and a domain head on the pooled
final hidden states. Its forward returns the objective through `prada_loss`, which reads
the LM head weight directly: under ZeRO-3 the weights the op reads are registered as
external parameters of this module, so DeepSpeed gathers them for its forward and routes
their gradients back to the partitions. Its settings: one PradaConfig (config.py); its
greedy decoding: generation.py; what it saves to DIR/final and loads back: final.py."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from prada_fast.models.config import PradaConfig
from prada_fast.models.generation import greedy_generate
from prada_fast.models.loading import ModelError
from prada_fast.models.mmd import mmd_term
from prada_fast.models.packed_attention import backbone_forward, packed_next_targets
from prada_fast.models.prompts import PromptEncoder
from prada_fast.op import IGNORE_INDEX, confusion_term, grad_reverse, masked_mean, prada_loss



class DomainHead(nn.Module):
    """Linear (D x H) or MLP (Linear-ReLU-Linear) classifier of the pooled features."""

    def __init__(self, hidden: int, n_domains: int, kind: str = "linear", mlp_hidden: int = 0):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.out = nn.Linear(hidden, n_domains)
        elif kind == "mlp":
            self.inner = nn.Linear(hidden, mlp_hidden or hidden)
            self.out = nn.Linear(mlp_hidden or hidden, n_domains)
        else:
            raise ModelError(f"domain head {kind!r}: expected 'linear' or 'mlp'")

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Domain logits of pooled features f (B, H)."""
        return self.out(torch.relu(self.inner(f)) if self.kind == "mlp" else f)


def initial_prompt(emb: torch.Tensor, k: int, hidden: int, how: str) -> torch.Tensor:
    """The soft prompt's K starting vectors (torch's global generator draws them): "random",
    Gaussian with the input embeddings' standard deviation; "vocab", the embeddings of K
    token ids drawn uniformly from the vocabulary (prompt tuning's start on a pretrained
    model: vectors the student already reads)."""
    emb = emb.detach()
    if how == "vocab":
        if not emb.numel():
            raise ModelError("--prompt-init vocab reads the input embeddings: they are not here "
                             "(partitioned before the model was built?)")
        return emb[torch.randint(emb.shape[0], (k,))].clone()
    std = float(emb.std()) if emb.numel() else 0.02
    return torch.randn(k, hidden, dtype=emb.dtype) * std


class PradaModel(nn.Module):
    """Student + soft prompt + domain head; `forward` gives (loss, parts).

    prompt_encoder "mlp" or "lstm": the soft prompt is produced from the free vectors
    `soft_prompt` by a P-tuning encoder (prompts.py) while training; `prompt_vectors()` is
    what goes in front of the input either way, and what the export saves."""

    def __init__(self, student, config: PradaConfig):
        super().__init__()
        if not isinstance(config, PradaConfig):
            raise TypeError("PradaModel(student, config): config must be a PradaConfig, got "
                            f"{type(config).__name__}")
        self.prada_config = config
        # read by the forward, the trainer and the tests (the config is frozen: copies stay true)
        self.n_prompt, self.pool, self.adversary = config.n_prompt, config.pool, config.adversary
        self.loss_impl = config.loss_impl
        self.student = student
        H = student.config.hidden_size
        emb = student.get_input_embeddings().weight
        self.soft_prompt = nn.Parameter(initial_prompt(emb, self.n_prompt, H, config.prompt_init)) \
            if self.n_prompt > 0 else None
        self.prompt_encoder = (PromptEncoder(H, config.prompt_encoder, config.prompt_hidden).to(emb.dtype)
                               if config.prompt_encoder != "none" else None)
        self.domain_head = DomainHead(H, config.n_domains, config.head, config.mlp_hidden)
        n_layers = len(self.backbone.layers)
        if config.pool_layer is not None and config.pool_layer > n_layers:
            raise ModelError(f"pool layer {config.pool_layer}: the student has {n_layers} decoder layers "
                             f"(0: the input embeddings, 1..{n_layers}: a layer's output)")
        # The op reads these weights outside their modules' forward: let ZeRO-3 gather them.
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
        lm_head = student.get_output_embeddings()
        for p in (lm_head.weight, getattr(lm_head, "bias", None), self.domain_head.out.weight,
                  self.domain_head.out.bias):
            if p is not None:
                register_external_parameter(self, p)

    def release_domain_head(self) -> DomainHead:
        """Take the domain head out of this module's parameters (the trainer's --domain-steps
        K >= 1, before DeepSpeed wraps the module) and return it: it stays this module's
        `domain_head`, read by the forward as before, but as a plain attribute, so that
        ZeRO-3 never partitions, casts or optimizes it and the module's state dict leaves it
        out (trainer/domain_steps.py trains it and checkpoints it)."""
        from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter
        head = self._modules.pop("domain_head")
        for p in (head.out.weight, head.out.bias):
            if p is not None:
                unregister_external_parameter(self, p)
        self.__dict__["domain_head"] = head
        return head

    def _head_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """x in the domain head's dtype: a released head (`release_domain_head`) stays fp32
        while DeepSpeed may run the student in bf16; a no-op otherwise."""
        return x.to(self.domain_head.out.weight.dtype)

    @property
    def backbone(self):
        return getattr(self.student, self.student.base_model_prefix)

    def prompt_vectors(self) -> torch.Tensor | None:
        """(K, H): the soft prompt put in front of the input (None without one)."""
        if self.soft_prompt is None or self.prompt_encoder is None:
            return self.soft_prompt
        return self.prompt_encoder(self.soft_prompt)

    def embed(self, input_ids, attention_mask):
        """Input embeddings with the soft prompt in front, and the extended mask."""
        emb = self.student.get_input_embeddings()(input_ids)
        if self.soft_prompt is None:
            return emb, attention_mask
        B = input_ids.shape[0]
        prompt = self.prompt_vectors().to(emb.dtype).unsqueeze(0).expand(B, -1, -1)
        ones = attention_mask.new_ones(B, self.n_prompt)
        return torch.cat([prompt, emb], 1), torch.cat([ones, attention_mask], 1)

    def hidden_states(self, input_ids, attention_mask):
        emb, mask = self.embed(input_ids, attention_mask)
        out = self.backbone(inputs_embeds=emb, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, mask

    def pool_mask(self, attention_mask, labels):
        """(B, K + T) 0/1 mask of the positions the domain features pool over: the question
        (its prompt "Q: ...\nA:", where labels are ignore_index) with pool="question", every
        real token with "sequence"; never the K soft-prompt positions or padding. Pooling
        past the question would let the head tell a labelled source sequence (question,
        rationale, answer) from an unlabelled target one (question only) by its length."""
        m = attention_mask.bool()
        if self.pool == "question":
            m = m & (labels == IGNORE_INDEX)
        return torch.cat([m.new_zeros(m.shape[0], self.n_prompt), m], 1).to(attention_mask.dtype)

    @contextlib.contextmanager
    def pooled_layer(self):
        """Yields a dict that, after a forward of the student inside the block, holds under
        "states" the output of decoder layer pool_layer (0: its input, the embeddings with
        the soft prompt): what the domain features pool. Empty without a pool_layer (the
        features are then the final normed hidden states, the op's input)."""
        box, layer = {}, self.prada_config.pool_layer
        if layer is None:
            yield box
            return

        def keep(states):
            box["states"] = states[0] if isinstance(states, tuple) else states
        layers = self.backbone.layers
        if layer == 0:
            hook = layers[0].register_forward_pre_hook(
                lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        else:
            hook = layers[layer - 1].register_forward_hook(lambda m, args, out: keep(out))
        try:
            yield box
        finally:
            hook.remove()

    def pooled_features(self, input_ids, attention_mask, labels):
        """f (B, H): the student's hidden states (final, or pool_layer's) averaged over `pool_mask`."""
        with self.pooled_layer() as layer:
            hidden, _ = self.hidden_states(input_ids, attention_mask)
        return masked_mean(layer.get("states", hidden), self.pool_mask(attention_mask, labels))

    def layer_pooled_features(self, input_ids, attention_mask, labels):
        """(L + 1, B, H): the output of every layer over [soft prompt | tokens] averaged over
        `pool_mask`, as the domain features are: the input embeddings (soft prompt included)
        first, then each decoder layer's, the last one after the final norm (as transformers
        returns hidden_states; the final features without a pool_layer)."""
        emb, mask = self.embed(input_ids, attention_mask)
        states = self.backbone(inputs_embeds=emb, attention_mask=mask, use_cache=False,
                               output_hidden_states=True).hidden_states
        pool = self.pool_mask(attention_mask, labels)
        return torch.stack([masked_mean(h, pool) for h in states])

    def packed_hidden_states(self, input_ids, attention_mask, position_ids, seq_index):
        """Final hidden states (rows, T, H) of packed rows (packing.py): each sequence's
        prompt slots (seq_index >= 0, attention_mask 0) hold the soft prompt, vector p at
        position id p; attention stays within each sequence."""
        emb = self.student.get_input_embeddings()(input_ids)
        if self.soft_prompt is not None:
            slot = ((seq_index >= 0) & (attention_mask == 0)).unsqueeze(-1)
            prompt = self.prompt_vectors().to(emb.dtype)[position_ids.clamp(max=self.n_prompt - 1)]
            emb = torch.where(slot, prompt, emb)
        return backbone_forward(self.backbone, position_ids, inputs_embeds=emb)

    def _padded_inputs(self, input_ids, attention_mask, labels, teacher_hidden, topk):
        """(hidden, next-token targets, pool mask, teacher hidden, top-k teacher) over
        [prompt | tokens]; the teacher's prompt rows are ignored."""
        hidden, mask = self.hidden_states(input_ids, attention_mask)
        B, K = input_ids.shape[0], self.n_prompt
        targets = torch.full_like(mask, IGNORE_INDEX, dtype=torch.long)
        targets[:, K:-1] = labels[:, 1:]  # position t predicts token t+1
        if teacher_hidden is not None and K:
            teacher_hidden = torch.cat([teacher_hidden.new_zeros(B, K, teacher_hidden.shape[-1]),
                                        teacher_hidden], 1)
        if K:
            topk = {n: torch.cat([t[:, :1].expand(-1, K, -1), t], 1) for n, t in topk.items()}
        return hidden, targets, self.pool_mask(attention_mask, labels), teacher_hidden, topk

    def _packed_inputs(self, input_ids, attention_mask, labels, position_ids, seq_index):
        """(hidden, targets, pool mask) of packed rows: a token's target is the next token of
        its own sequence (none for the last, nor for prompt slots and padding)."""
        hidden = self.packed_hidden_states(input_ids, attention_mask, position_ids, seq_index)
        targets = packed_next_targets(labels, attention_mask, seq_index, IGNORE_INDEX)
        pool = attention_mask.bool() & (labels == IGNORE_INDEX) if self.pool == "question" \
            else attention_mask.bool()
        return hidden, targets, pool.to(attention_mask.dtype)

    def question_lm_targets(self, input_ids, attention_mask, labels, seq_index=None):
        """Next-token targets of the auxiliary language-model term, aligned with the hidden
        states (padded: [prompt | tokens]; packed: the rows): at a question token (a real
        token whose label is ignored: the prompt "Q: ...\nA:" of a source record, the whole
        of a target record) whose next token, in the same sequence, is a question token too;
        IGNORE_INDEX elsewhere (the first labelled token is the task term's)."""
        question = (attention_mask != 0) & (labels == IGNORE_INDEX)
        nxt = question[:, :-1] & question[:, 1:]
        if seq_index is not None:
            nxt = nxt & (seq_index[:, 1:] == seq_index[:, :-1])
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        targets[:, :-1] = torch.where(nxt, input_ids[:, 1:], targets[:, 1:])
        if seq_index is None and self.n_prompt:
            targets = torch.cat([targets.new_full((targets.shape[0], self.n_prompt), IGNORE_INDEX),
                                 targets], 1)
        return targets

    def question_lm_loss(self, hidden, targets):
        """Mean cross-entropy of the question tokens' next tokens (`question_lm_targets`)
        through the loss op on those rows only: the full logits are never built."""
        lm_head = self.student.get_output_embeddings()
        rows = targets != IGNORE_INDEX
        if not bool(rows.any()):
            return hidden.sum() * 0.0
        lm, _ = prada_loss(hidden[rows].unsqueeze(0), lm_head.weight, targets[rows].unsqueeze(0),
                           lm_bias=getattr(lm_head, "bias", None), alpha=1.0, impl=self.loss_impl)
        return lm

    def forward(self, input_ids, attention_mask, labels, domain_labels, *, teacher_hidden=None,
                teacher_weight=None, adv_lambda=1.0, num_valid_tokens=None, temperature=1.0,
                alpha=0.5, use_domain=True, features_only=False, teacher_topk_ids=None,
                teacher_topk_logprobs=None, position_ids=None, seq_index=None, question_index=None,
                lm_weight=0.0, keep_pooled=False):
        """(loss, parts) of PRADA's objective on a batch. features_only: (pooled features f,
        domain logits) instead, no loss (a forward through this module, so that ZeRO-3
        gathers the soft prompt and the head for it). Packed rows (packing.py): position_ids
        and seq_index (rows, T), domain_labels (S,), the teacher's inputs in the rows' layout.
        question_index (one per row, or per packed sequence): rows that share a question
        (several rationales of it, numbered 0..Q-1) pool into one feature, so that the
        question counts once in the domain loss; each row keeps its task loss. adv_lambda:
        the adversary's scale (the schedule's lambda; with adversary "mmd", the MMD term's
        weight). lm_weight: W of the auxiliary language-model term on every sequence's
        question (targets included: task-adaptive pretraining's unlabelled text), W times
        its mean over the batch's question tokens (`question_lm_loss`), in parts as "lm".
        keep_pooled: parts["pooled"] is (the pooled features, detached; their domain labels),
        per sequence as the domain term sees them (the trainer's --domain-steps trains the
        head on them)."""
        if features_only:
            f = self.pooled_features(input_ids, attention_mask, labels)
            return f, self.domain_head(self._head_dtype(f))
        topk = {}  # the teacher as cached top-k log-probabilities
        if teacher_topk_ids is not None:
            topk = {"teacher_topk_ids": teacher_topk_ids, "teacher_topk_logprobs": teacher_topk_logprobs}
        lm_targets = (self.question_lm_targets(input_ids, attention_mask, labels, seq_index)
                      if lm_weight else None)  # before per_question renumbers seq_index
        with self.pooled_layer() as layer:
            if seq_index is not None:
                hidden, targets, pool = self._packed_inputs(input_ids, attention_mask, labels,
                                                            position_ids, seq_index)
            else:
                hidden, targets, pool, teacher_hidden, topk = self._padded_inputs(
                    input_ids, attention_mask, labels, teacher_hidden, topk)
        features = layer.get("states", hidden)  # what the domain features pool
        lm_head = self.student.get_output_embeddings()
        # a linear head on the final states runs in the op; an MLP head or another layer's
        # features in plain PyTorch below
        linear_dom = use_domain and self.domain_head.kind == "linear" and "states" not in layer
        pool = pool.to(hidden.dtype)
        mmd = use_domain and self.adversary == "mmd"  # the head only watches; MMD aligns
        adversary, op_lambda = ("confusion", 0.0) if mmd else (self.adversary, adv_lambda)
        if use_domain and question_index is not None:
            seq_index, domain_labels = self.per_question(question_index, domain_labels, seq_index,
                                                         hidden.shape[1])
        n_seq = None if seq_index is None else len(domain_labels)
        dw, db = (self.domain_head.out.weight, self.domain_head.out.bias) if linear_dom else (None, None)
        if dw is not None and dw.dtype != hidden.dtype:  # a released fp32 head, a bf16 student
            dw, db = dw.to(hidden.dtype), None if db is None else db.to(hidden.dtype)
        loss, parts = prada_loss(
            hidden, lm_head.weight, targets, lm_bias=getattr(lm_head, "bias", None),
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            temperature=temperature, alpha=alpha, num_valid_tokens=num_valid_tokens,
            pool_mask=pool,
            domain_weight=dw, domain_bias=db,
            domain_labels=domain_labels if linear_dom else None,
            seq_index=seq_index if linear_dom else None,
            adv_lambda=op_lambda, adversary=adversary, impl=self.loss_impl, **topk)
        # the pooled features, where plain PyTorch needs them (an MLP head, another layer, MMD)
        f = masked_mean(features, pool, seq_index, n_seq) if use_domain and (
            mmd or not linear_dom or keep_pooled) else None
        if use_domain and not linear_dom:  # plain PyTorch, either adversary
            grl = adversary == "grl"
            c = self.domain_head(self._head_dtype(grad_reverse(f, op_lambda) if grl else f.detach()))
            c = c.to(torch.promote_types(c.dtype, torch.float32))
            dom = nn.functional.cross_entropy(c, domain_labels)
            loss = loss + dom
            if not grl:
                head = lambda x: self.domain_head(self._head_dtype(x))  # noqa: E731
                loss = loss + confusion_term(f, head, op_lambda).to(loss.dtype)
            parts["dom"] = dom.detach()
            parts["dom_acc"] = (c.argmax(-1) == domain_labels).to(c.dtype).mean()
        if mmd:
            align = mmd_term(f, domain_labels)
            loss = loss + (adv_lambda * align).to(loss.dtype)
            parts["mmd"] = align.detach()
        if use_domain and keep_pooled:  # what the head trains on with --domain-steps
            parts["pooled"] = (f.detach(), domain_labels)
        if lm_weight:
            lm = self.question_lm_loss(hidden, lm_targets)
            loss = loss + (lm_weight * lm).to(loss.dtype)
            parts["lm"] = lm.detach()
        return loss, parts

    @staticmethod
    def per_question(question_index, domain_labels, seq_index, width: int):
        """(seq_index: every position carries its question's number (-1: none), domain
        labels (Q,), one per question): the op then pools the rows (or packed sequences) of
        a question together. question_index and domain_labels have one entry per row, or
        per packed sequence when seq_index is given. Their question tokens come first and
        are the same, so under causal attention (per sequence) their pooled features are
        the same too: the pool is that feature, with the question's weight that of one row."""
        Q = int(question_index.max()) + 1
        labels = domain_labels.new_zeros(Q).scatter_(0, question_index, domain_labels)
        if seq_index is None:
            return question_index[:, None].expand(-1, width).contiguous(), labels
        return torch.where(seq_index >= 0, question_index[seq_index.clamp(min=0)], -1), labels

    def generate(self, input_ids, attention_mask, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int):
        """Greedy decoding from left-padded prompts, soft prompt included (generation.py)."""
        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id,
                               pad_token_id)

    # -- what is ours in DIR/final (the student itself is saved by save_pretrained): final.py
    @staticmethod
    def save_heads(out_dir, state: dict, meta: dict) -> None:
        from prada_fast.models.final import save_heads
        save_heads(out_dir, state, meta)

    @staticmethod
    def load_heads(path) -> dict:
        from prada_fast.models.final import load_heads
        return load_heads(path)

    @classmethod
    def from_final(cls, path, attn: str = "auto", loss_impl: str = "auto"):
        """(model, tokenizer, saved metadata) of DIR/final (final.load_final)."""
        from prada_fast.models.final import load_final
        return load_final(path, attn=attn, loss_impl=loss_impl)
