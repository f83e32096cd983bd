"""One Model called from several threads: each call keeps its own knobs, KV cache and counters."""

import threading

import edge_moe

PROMPT = list(range(3, 23))


def test_two_threads_generating_at_once_get_what_each_gets_alone(wide_model):
    """The same prompt at 3 and at 6 bits, alone and then in two threads at once: a knob or a KV cache
    shared between the calls would change one of them."""
    with edge_moe.load(wide_model, resident_forms=False) as m:
        alone = {b: list(m.generate_ids(PROMPT, max_tokens=12, bits=b)) for b in (3, 6)}
        got, errors = {}, []

        def run(bits):
            try:
                got[bits] = list(m.generate_ids(PROMPT, max_tokens=12, bits=bits))
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=run, args=(b,)) for b in (3, 6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert alone[3] != alone[6]  # the knob changes the tokens on this model
    assert got == alone
