

def test_spans_answer_as_a_scan_would() -> None:
    """verify's span lookup (bisect over merged spans) agrees with the linear scan it
    replaced, for nested, overlapping, touching and empty spans."""
    import random

    from rewriters.verify import _Spans

    rng = random.Random(14)
    for _ in range(200):
        spans = []
        for _ in range(rng.randrange(0, 12)):
            start = rng.randrange(0, 100)
            spans.append((start, start + rng.randrange(0, 30)))
        fast = _Spans(spans)
        assert bool(fast) == any(s < e for s, e in spans)
        for pos in range(-2, 135):
            assert (pos in fast) == any(s <= pos < e for s, e in spans), (spans, pos)
