"""ListOps (Nangia & Bowman 2018) as generated for the Long Range Arena (P29).

Rules, from the LRA generator (google-research/long-range-arena, `lra_benchmarks/data/listops.py`, Apache-2.0; read
for the rules only, see ../shared/papers/facts_P28_P54.md):
  - operators MIN, MAX, MED (int(median), i.e. the mean of the two middle values truncated), SM (sum mod 10);
    values 0..9; a list closes with ']';
  - a tree node at depth d < max_depth (10) is a leaf with probability 0.75 (a value uniform in 0..9); otherwise it
    has k ~ randint(2, max_args = 10) children at depth d + 1 and an operator drawn uniformly; at max_depth it is a
    leaf; the root is drawn at depth 1;
  - length counts operators, values and ']' (2 + the children's lengths for a list); a tree is kept when
    min_len < length < max_len (500, 2000 in the paper) and it is new (de-duplicated).
Tokenisation as S4 and most PyTorch ports: parentheses dropped, ']' kept, split on spaces: 15 symbols,
ids 1..15 with 0 for padding.

The label is computed from the token sequence by a stack machine (`evaluate_tokens`), not from the tree that
produced it, so a test can hold it to an independent recursive evaluation of the tree.
"""

from __future__ import annotations

import random
from typing import Union

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
SYMBOLS = OPERATORS + tuple(str(v) for v in range(10)) + ("]",)
TOKEN_ID = {s: i + 1 for i, s in enumerate(SYMBOLS)}  # 0 = padding
VOCAB = len(SYMBOLS) + 1
VALUE_P = 0.25  # the probability of a list (the official VALUE_P: a node is a leaf when r > 0.25)

Tree = Union[int, tuple]  # a value, or (operator, [children])


def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10) -> tuple[Tree, int]:
    """(tree, length) with the official branching rule; length counts operators, values and ']'."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.randint(0, 9), 1
    k = rng.randint(2, max_args)
    op = OPERATORS[rng.randrange(len(OPERATORS))]
    children, length = [], 2
    for _ in range(k):
        child, n = generate_tree(rng, depth + 1, max_depth, max_args)
        children.append(child)
        length += n
    return (op, children), length


def tokens(tree: Tree) -> list[str]:
    """The S4-style token list: '[OP' child ... ']' without parentheses."""
    out: list[str] = []
    stack = [tree]
    while stack:  # iterative pre-order: deep trees do not hit the recursion limit
        node = stack.pop()
        if isinstance(node, str):  # a closing bracket pushed below its list's children
            out.append(node)
        elif isinstance(node, tuple):
            op, children = node
            out.append(op)
            stack.append("]")
            stack.extend(reversed(children))
        else:
            out.append(str(node))
    return out


def apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2  # int(np.median): truncation, values >= 0
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def evaluate_tokens(toks: list[str]) -> int:
    """Value of a token list with a stack machine: an operator opens a frame, a value joins the top frame, ']'
    reduces the top frame and passes its value down."""
    stack: list[tuple[str, list[int]]] = []
    result = None
    for t in toks:
        if t in OPERATORS:
            stack.append((t, []))
        elif t == "]":
            op, args = stack.pop()
            v = apply(op, args)
            if stack:
                stack[-1][1].append(v)
            else:
                result = v
        else:
            v = int(t)
            if stack:
                stack[-1][1].append(v)
            else:
                result = v
    if stack or result is None:
        raise ValueError("unbalanced ListOps expression")
    return result


def generate(n: int, min_len: int, max_len: int, seed: int, seen: set | None = None, max_depth: int = 10,
             max_args: int = 10) -> list[tuple[list[str], int]]:
    """`n` distinct (tokens, label) examples with min_len < length < max_len, deterministic in `seed`. `seen`
    (token tuples) is shared across splits so that no example repeats between them."""
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    out = []
    while len(out) < n:
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if not min_len < length < max_len:
            continue
        toks = tokens(tree)
        key = tuple(toks)
        if key in seen:
            continue
        seen.add(key)
        out.append((toks, evaluate_tokens(toks)))
    return out


def encode(toks: list[str], length: int) -> list[int]:
    """Token ids padded with 0 to `length` (a longer list is an error: the generator bounds lengths)."""
    if len(toks) > length:
        raise ValueError(f"ListOps example of {len(toks)} tokens does not fit length {length}")
    return [TOKEN_ID[t] for t in toks] + [0] * (length - len(toks))
