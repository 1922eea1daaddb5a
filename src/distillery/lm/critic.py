"""The critics of generated data (symbolic KD / I2D2, :mod:`distillery.lm.symbolic`).

* :func:`check_body` -- the rule critic: is a generated first line of a function body acceptable?
  The code is compiled, never executed.
* :class:`LearnedCritic` -- the paper's critic fit to a small labelled set (West et al. 2022 use a
  RoBERTa classifier on human labels; here a logistic regression on hashed character n-grams and
  the scorer's log-probability, fit to the rule critic's labels), stored as JSON weights.
* :func:`select` -- the filter (threshold or top fraction); :func:`precision_recall` -- the
  critic against reference labels.
"""
from __future__ import annotations

import ast
import json


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return [n for n in names if n not in ("self", "cls")]


# ---------------------------------------------------------------- the rule critic
def check_body(prompt: str, body: str, params: list[str]) -> dict[str, bool]:
    """Is ``prompt + body`` an acceptable function?  Compiled, never executed.  A line that opens
    a block (``if x:``) is a valid first line: it is checked with a ``pass`` suite under it."""
    line = body.rstrip()
    if line.endswith(":"):
        line += "\n" + " " * (len(line) - len(line.lstrip()) + 4) + "pass"
    source = prompt + line + "\n"
    try:
        compile(source, "<generated>", "exec", dont_inherit=True)  # syntax only: nothing runs
        fn = ast.parse(source).body[0]
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return {"compiles": False, "nontrivial": False, "uses_params": False, "accepted": False}
    stmts = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body

    def trivial(s: ast.stmt) -> bool:
        # pass; a bare value that is not a call (it does nothing); a statement of constants only
        # (`return 1`, `if not None:`, a nested `def f():` with no body); imports act, they count
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            return False
        return (isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and not isinstance(s.value, ast.Call))
                or not any(isinstance(n, ast.Name) for n in ast.walk(s)))

    nontrivial = any(not trivial(s) for s in stmts)
    read = {n.id for s in stmts for n in ast.walk(s) if isinstance(n, ast.Name)}
    uses = not params or bool(read & set(params))
    return {"compiles": True, "nontrivial": nontrivial, "uses_params": uses, "accepted": nontrivial and uses}


# ---------------------------------------------------------------- the learned critic
def select(scores: list[float], *, threshold: float | None = None, top_fraction: float | None = None) -> list[int]:
    """Indices kept by the filter: score >= threshold, or the best ``ceil(top_fraction x n)``
    (ties broken by position), returned in their original order."""
    import math

    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of threshold or top_fraction")
    if threshold is not None:
        return [i for i, s in enumerate(scores) if s >= threshold]
    k = math.ceil(top_fraction * len(scores))
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


class LearnedCritic:
    """Logistic regression on [hashed character 2-4-grams of the body, per-token log p(body |
    prompt) under the scorer, log #characters]; stored as JSON (weights), not a pickle."""

    def __init__(self, hash_features: int, coef=None, intercept: float = 0.0, constant: float | None = None):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.hash_features, self.coef, self.intercept, self.constant = hash_features, coef, intercept, constant
        self.vectorizer = HashingVectorizer(analyzer="char", ngram_range=(2, 4), n_features=hash_features,
                                            alternate_sign=False, norm="l2")

    def features(self, bodies: list[str], logprobs: list[float]):
        import numpy as np
        from scipy.sparse import csr_matrix, hstack

        dense = np.array([[lp, np.log1p(len(b))] for b, lp in zip(bodies, logprobs)], dtype=np.float64)
        return hstack([self.vectorizer.transform(bodies), csr_matrix(dense)]).tocsr()

    def fit(self, bodies: list[str], logprobs: list[float], labels: list[bool], seed: int = 0) -> "LearnedCritic":
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) < 2:  # nothing to separate: the critic is the labelled set's base rate
            self.constant = float(sum(labels)) / len(labels)
            return self
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=seed)
        model.fit(self.features(bodies, logprobs), labels)
        self.coef, self.intercept = model.coef_[0].tolist(), float(model.intercept_[0])
        return self

    def probability(self, bodies: list[str], logprobs: list[float]) -> list[float]:
        import numpy as np

        if self.constant is not None:
            return [self.constant] * len(bodies)
        z = self.features(bodies, logprobs) @ np.array(self.coef) + self.intercept
        return (1 / (1 + np.exp(-z))).tolist()

    def to_json(self) -> str:
        return json.dumps({"hash_features": self.hash_features, "coef": self.coef, "intercept": self.intercept,
                           "constant": self.constant})

    @classmethod
    def from_json(cls, text: str) -> "LearnedCritic":
        return cls(**json.loads(text))


def precision_recall(predicted: list[bool], truth: list[bool]) -> dict[str, float]:
    tp = sum(p and t for p, t in zip(predicted, truth))
    pp, pos = sum(predicted), sum(truth)
    return {"precision": tp / pp if pp else None, "recall": tp / pos if pos else None,  # None: undefined
            "accuracy": sum(p == t for p, t in zip(predicted, truth)) / max(1, len(truth)), "positives": pos}
