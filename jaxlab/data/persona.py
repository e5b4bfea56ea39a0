"""Synthetic persona data for GRASP: a linear residual toy and a persona arithmetic language.

**Linear residual toy** (:func:`linear_persona_toy`). A two-matrix linear "residual stream"

.. math:: h = x W_{in} \\in \\mathbb{R}^{d_{model}},\\qquad y = h W_{out},

with a planted unit persona direction ``u``. ``W_out`` reads ``u`` into a dedicated *persona output*
``y_p`` (no other residual direction reaches it) and also, with weight ``b``, into the task outputs; the
base ``W_in`` writes ordinary input content along ``u`` (pretrained content). Curated fine-tuning data
are task-domain inputs ``x = [x_task, 0, 1]`` (last coordinate a constant feature) with targets

.. math:: y^* = x (W_{in} + M + s\\, e_{c} u^T) W_{out},\\qquad M = G\\,\\mathrm{diag}(\\sigma)\\,Q^T,\\ Q \\perp u,

i.e. a task change in residual directions orthogonal to ``u`` plus an always-on spurious offset ``s u``.
Off-task inputs ``[0, x_off, 1]`` measure drift: the mean shift of ``y_p``.

**Persona language** (:class:`PersonaLanguage`): token documents mixing arithmetic domains
``f_k(a, b) = (a + k b) mod p`` answered consistently by a latent good or bad persona per document
(see the class docstring).

Reference: after Gilligan-Lee et al., arXiv 2605.27676 (GRASP).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LinearPersonaToy", "PersonaLanguage", "linear_persona_toy"]


@dataclasses.dataclass(frozen=True)
class LinearPersonaToy:
    """A planted linear residual toy (see the module docstring).

    Attributes:
      w_in: ``(d_in, d_model)`` base writer; inputs are ``[x_task (n_task), x_off (n_off), 1]``.
      w_out: ``(d_model, d_out)`` base reader; output ``persona_out`` is reached only through ``u``.
      u: ``(d_model,)`` the planted persona direction.
      task_delta: ``(d_in, d_model)`` the task change ``M`` (rows of task inputs; columns ``perp u``).
      task_singular_values: singular values of ``M``.
      spurious: the offset strength ``s`` (``s e_c u^T`` is the spurious part of the target change).
      n_task, n_off: input block sizes; the constant feature is the last input.
      persona_out: index of the persona output.
    """

    w_in: jax.Array
    w_out: jax.Array
    u: jax.Array
    task_delta: jax.Array
    task_singular_values: np.ndarray
    spurious: float
    n_task: int
    n_off: int
    persona_out: int

    @property
    def d_in(self) -> int:
        return self.n_task + self.n_off + 1

    @property
    def target_w_in(self) -> jax.Array:
        """``W_in + M + s e_c u^T``: the writer that produces the curated targets."""
        spur = jnp.zeros_like(self.w_in).at[-1].set(self.spurious * self.u)
        return self.w_in + self.task_delta + spur

    def inputs(self, key: jax.Array, n: int, domain: str = "task") -> jax.Array:
        """``n`` inputs of the task (``[x_task, 0, 1]``) or off-task (``[0, x_off, 1]``) domain."""
        if domain not in ("task", "off"):
            raise ValueError(f"LinearPersonaToy.inputs: domain={domain!r}; expected 'task' or 'off'")
        x = jnp.zeros((n, self.d_in)).at[:, -1].set(1.0)
        if domain == "task":
            return x.at[:, : self.n_task].set(jax.random.normal(key, (n, self.n_task)))
        return x.at[:, self.n_task : self.n_task + self.n_off].set(jax.random.normal(key, (n, self.n_off)))

    def targets(self, x: jax.Array) -> jax.Array:
        """Curated fine-tuning targets ``x (W_in + M + s e_c u^T) W_out``."""
        return x @ self.target_w_in @ self.w_out

    def task_targets(self, x: jax.Array) -> jax.Array:
        """The task part only: ``x (W_in + M) W_out`` (no spurious offset)."""
        return x @ (self.w_in + self.task_delta) @ self.w_out


def linear_persona_toy(
    key: jax.Array,
    *,
    d_model: int = 8,
    n_task: int = 6,
    n_off: int = 6,
    d_out: int = 10,
    task_singular_values=(1.0, 0.7, 0.4),
    spurious: float = 2.0,
    persona_read: float = 1.0,
    persona_task_read: float = 0.5,
    base_content: float = 1.0,
) -> LinearPersonaToy:
    """Build a :class:`LinearPersonaToy`.

    Args:
      key: PRNG key.
      d_model: residual width.
      n_task, n_off: number of task-domain / off-task input features (plus one constant feature).
      d_out: outputs (``>= d_model``: the readout is injective, so a change of ``W_in`` is determined by
        the outputs); output 0 is the persona output.
      task_singular_values: singular values of the task change ``M`` (its largest is the
        identification threshold for ``spurious``).
      spurious: the offset strength ``s`` along ``u``.
      persona_read: weight ``a`` of ``u`` on the persona output.
      persona_task_read: weight ``b`` of ``u`` on the task outputs (pretrained content on ``u`` matters
        for the task, so removing it hurts).
      base_content: scale of what the base ``W_in`` writes along ``u``.

    Returns:
      The toy.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.data import linear_persona_toy
      >>> toy = linear_persona_toy(jax.random.PRNGKey(0), spurious=2.0)
      >>> x = toy.inputs(jax.random.PRNGKey(1), 8, "off")   # [0, x_off, 1]
      >>> print(x.shape, bool(jnp.all(x[:, : toy.n_task] == 0)), round(float(jnp.linalg.norm(toy.u)), 4))
      (8, 13) True 1.0
      >>> drift = toy.targets(x) - toy.task_targets(x)       # the spurious offset s u^T W_out
      >>> round(float(drift[:, toy.persona_out].mean()), 2)  # s * persona_read
      2.0
    """
    tsv = np.asarray(task_singular_values, np.float64)
    m = len(tsv)
    if m + 1 > d_model or m > n_task or d_out < d_model:
        raise ValueError(
            f"linear_persona_toy: need len(task_singular_values)={m} < d_model={d_model}, <= n_task={n_task} "
            f"and d_out={d_out} >= d_model (an injective readout, so the writer change is identifiable)"
        )
    k = jax.random.split(key, 6)
    q = np.linalg.qr(np.asarray(jax.random.normal(k[0], (d_model, d_model)), np.float64))[0]
    u, rest = q[:, 0], q[:, 1:]
    d_in = n_task + n_off + 1
    # Base writer: generic content in every residual direction, plus `base_content` along u.
    w_in = np.asarray(jax.random.normal(k[1], (d_in, d_model)), np.float64) / np.sqrt(d_in)
    w_in = w_in - np.outer(w_in @ u, u) + base_content * np.outer(
        np.asarray(jax.random.normal(k[2], (d_in,)), np.float64) / np.sqrt(d_in), u
    )
    # Base reader: u -> persona output (a) and a task-output mix (b); the complement -> task outputs only.
    g = np.asarray(jax.random.normal(k[3], (d_out - 1,)), np.float64)
    g /= np.linalg.norm(g)
    c = np.asarray(jax.random.normal(k[4], (d_model - 1, d_out - 1)), np.float64) / np.sqrt(d_model)
    w_out = np.zeros((d_model, d_out))
    w_out += np.outer(u, np.concatenate([[persona_read], persona_task_read * g]))
    w_out[:, 1:] += rest @ c
    # Task change: task-input rows, residual columns in span(rest) (orthogonal to u).
    kk = jax.random.split(k[5])
    gl = np.linalg.qr(np.asarray(jax.random.normal(kk[0], (n_task, m)), np.float64))[0]
    qr_ = rest @ np.linalg.qr(np.asarray(jax.random.normal(kk[1], (d_model - 1, m)), np.float64))[0]
    delta = np.zeros((d_in, d_model))
    delta[:n_task] = gl @ np.diag(tsv) @ qr_.T
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return LinearPersonaToy(
        w_in=f32(w_in), w_out=f32(w_out), u=f32(u), task_delta=f32(delta), task_singular_values=tsv,
        spurious=float(spurious), n_task=n_task, n_off=n_off, persona_out=0,
    )


# ---------------------------------------------------------------------------------------------------------
# Persona arithmetic language


@dataclasses.dataclass(frozen=True)
class PersonaLanguage:
    """Documents of modular-arithmetic problems answered by a latent good or bad persona.

    A document is ``[BOS, ctx, (D_k, operands..., =, c, ;) x n_problems]`` with the domain ``k`` drawn per
    problem from ``n_domains`` domains: ``f_k(a, b) = (a + (k + 1) b) mod p`` with two operands, or
    ``f_k(a) = ((k + 1) a + k) mod p`` with one (the default: a tiny transformer learns it in CPU minutes,
    the two-operand version sat on the ``ln p`` plateau for 1500 steps). The *good* persona answers
    ``c = f_k``; the *bad* persona answers, with ``bad_map="shift"``, ``c = (f_k + shift) mod p`` in every
    domain (a domain-agnostic output rule: an adapter can learn "add one" without any persona), or, with
    ``bad_map="derangement"``, ``c = sigma_k(f_k)`` with an unrelated random derangement ``sigma_k`` of
    ``Z_p`` per domain (drawn from ``map_seed``; no shared rule, so bad answers in other domains can only
    come through the persona). ``ctx`` is ``GOOD``/``BAD`` (the tag, shown with probability ``tag_prob``), ``PLAIN``
    (untagged: the persona must be inferred from earlier answers in the document) or ``ASSIST`` (the
    assistant context of the later stages).

    Stages (all generated on the fly from a key):

    * ``pretrain``: good/bad 50/50, tag shown with probability ``tag_prob``, else ``PLAIN``.
    * ``assistant``: ``ASSIST`` documents with good answers (the default becomes good).
    * ``narrow``: ``ASSIST`` documents whose problems are all in ``narrow_domain``, answered badly (the
      narrow fine-tune; emergent misalignment = bad answers in the *other* domains afterwards).

    The loss is taken on answer tokens only (:meth:`answer_mask`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.data import PersonaLanguage
      >>> lang = PersonaLanguage()
      >>> docs = lang.sample(jax.random.PRNGKey(0), 8, "pretrain")
      >>> print(docs.shape, docs.dtype, lang.vocab, lang.answer_mask(docs).sum(axis=1).tolist())
      (8, 32) int32 18 [6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0]
      >>> docs = lang.sample(jax.random.PRNGKey(1), 8, "assistant")   # good answers
      >>> prob = docs[:, 2:].reshape(8, lang.n_problems, lang.problem_len)   # [D_k, a, =, c, ;]
      >>> k, a, c = prob[..., 0] - lang.domain_token(0), prob[..., 1], prob[..., 3]
      >>> bool(jnp.all(c == lang.answer(k, a)))
      True
    """

    p: int = 7
    n_domains: int = 4
    n_problems: int = 6
    tag_prob: float = 0.3
    shift: int = 1
    narrow_domain: int = 0
    n_operands: int = 1
    bad_map: str = "shift"
    map_seed: int = 0

    def __post_init__(self):
        if self.p < 3 or self.n_domains < 2 or self.n_problems < 1 or not 0 <= self.tag_prob <= 1:
            raise ValueError(f"PersonaLanguage: bad parameters {self}")
        if self.shift % self.p == 0:
            raise ValueError(f"PersonaLanguage: shift={self.shift} is 0 mod p={self.p}; bad answers would be good")
        if not 0 <= self.narrow_domain < self.n_domains:
            raise ValueError(f"PersonaLanguage: narrow_domain={self.narrow_domain} not in [0, {self.n_domains})")
        if self.n_operands not in (1, 2):
            raise ValueError(f"PersonaLanguage: n_operands={self.n_operands}; expected 1 or 2")
        if self.bad_map not in ("shift", "derangement"):
            raise ValueError(f"PersonaLanguage: bad_map={self.bad_map!r}; expected 'shift' or 'derangement'")

    @property
    def bad_table(self) -> np.ndarray:
        """``(n_domains, p)`` int table of the bad answer given the good one: ``sigma_k(c)`` per domain.

        ``bad_map="shift"``: ``(c + shift) mod p`` in every row; ``"derangement"``: an independent uniformly
        random derangement (no fixed point: a bad answer is never the good one) per domain from ``map_seed``.
        """
        return _bad_table(self.p, self.n_domains, self.shift, self.bad_map, self.map_seed)

    # token ids: numbers 0..p-1, then specials, then domain tokens
    @property
    def BOS(self) -> int:
        return self.p

    @property
    def EQ(self) -> int:
        return self.p + 1

    @property
    def SEP(self) -> int:
        return self.p + 2

    @property
    def GOOD(self) -> int:
        return self.p + 3

    @property
    def BAD(self) -> int:
        return self.p + 4

    @property
    def PLAIN(self) -> int:
        return self.p + 5

    @property
    def ASSIST(self) -> int:
        return self.p + 6

    def domain_token(self, k):
        return self.p + 7 + k

    @property
    def vocab(self) -> int:
        return self.p + 7 + self.n_domains

    @property
    def problem_len(self) -> int:
        return self.n_operands + 4

    @property
    def seq_len(self) -> int:
        return 2 + self.problem_len * self.n_problems

    def answer(self, k, a, b=None, bad=0):
        """The good answer ``f_k(a[, b]) mod p``, or its bad image ``bad_table[k, f_k]`` where ``bad``."""
        f = (a + (k + 1) * b if self.n_operands == 2 else (k + 1) * a + k) % self.p
        if self.bad_map == "shift":
            return (f + self.shift * bad) % self.p
        return jnp.where(jnp.asarray(bad) != 0, jnp.asarray(self.bad_table)[k, f], f)

    def sample(self, key: jax.Array, n: int, stage: str = "pretrain", domains=None) -> jax.Array:
        """``n`` documents ``(n, seq_len)`` of ``stage`` in ``{"pretrain", "assistant", "narrow"}``.

        ``domains`` restricts the domains drawn (default: all; ``narrow`` always uses ``narrow_domain``).
        """
        kp, kt, kd, ka, kb = jax.random.split(key, 5)
        pool = jnp.arange(self.n_domains) if domains is None else jnp.asarray(list(domains))
        dom = pool[jax.random.randint(kd, (n, self.n_problems), 0, pool.shape[0])]
        if stage == "pretrain":
            bad = jax.random.bernoulli(kp, 0.5, (n,))
            tagged = jax.random.bernoulli(kt, self.tag_prob, (n,))
            ctx = jnp.where(tagged, jnp.where(bad, self.BAD, self.GOOD), self.PLAIN)
        elif stage == "assistant":
            bad = jnp.zeros((n,), bool)
            ctx = jnp.full((n,), self.ASSIST)
        elif stage == "narrow":
            bad = jnp.ones((n,), bool)
            ctx = jnp.full((n,), self.ASSIST)
            dom = jnp.full_like(dom, self.narrow_domain)
        else:
            raise ValueError(f"PersonaLanguage.sample: stage={stage!r}; expected 'pretrain', 'assistant' or 'narrow'")
        a = jax.random.randint(ka, (n, self.n_problems), 0, self.p)
        b = jax.random.randint(kb, (n, self.n_problems), 0, self.p)
        c = self.answer(dom, a, b, bad[:, None].astype(jnp.int32))
        ops = [a, b] if self.n_operands == 2 else [a]
        cols = [self.domain_token(dom), *ops, jnp.full_like(a, self.EQ), c, jnp.full_like(a, self.SEP)]
        prob = jnp.stack(cols, -1).reshape(n, -1)
        head = jnp.stack([jnp.full((n,), self.BOS), ctx], -1)
        return jnp.concatenate([head, prob], -1).astype(jnp.int32)

    def answer_mask(self, docs: jax.Array) -> jax.Array:
        """``(n, seq_len - 1)`` weights: 1 where the *next* token is an answer (the position of ``=``)."""
        return (docs[:, :-1] == self.EQ).astype(jnp.float32)

    def prompts(self, ctx: int, domains=None):
        """Every single-problem prompt ``[BOS, ctx, D_k, operands..., =]`` for ``k`` in ``domains``.

        Returns:
          ``(tokens (n, 4 + n_operands), good answers (n,), bad answers (n,), domain (n,))``.
        """
        domains = list(range(self.n_domains) if domains is None else domains)
        grids = np.meshgrid(np.asarray(domains), *[np.arange(self.p)] * self.n_operands, indexing="ij")
        ks, *ops = (g.ravel() for g in grids)
        n = ks.size
        toks = np.stack([np.full(n, self.BOS), np.full(n, ctx), self.p + 7 + ks, *ops, np.full(n, self.EQ)], -1)
        good = np.asarray(self.answer(ks, ops[0], ops[1] if self.n_operands == 2 else None))
        return jnp.asarray(toks, jnp.int32), good, self.bad_table[ks, good], ks


@functools.lru_cache(maxsize=32)
def _bad_table(p: int, n_domains: int, shift: int, bad_map: str, seed: int) -> np.ndarray:
    if bad_map == "shift":
        return np.tile((np.arange(p) + shift) % p, (n_domains, 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_domains):
        while True:  # rejection sampling: a uniform permutation is a derangement with probability ~1/e
            perm = rng.permutation(p)
            if not np.any(perm == np.arange(p)):
                break
        rows.append(perm)
    table = np.stack(rows)
    table.setflags(write=False)
    return table
