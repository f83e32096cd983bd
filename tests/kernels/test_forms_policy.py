"""Which storage form a resident expert takes (cpu.ResidentForms) against the policy written out plainly,
and rewrites through it against the same forms made straight from the planes."""

import itertools

import numpy as np
import pytest

from edge_moe.format.layout import build_layout, pack_expert, to_units
from edge_moe.format.nested import MAX_BITS, quantize
from edge_moe.kernels import cpu, get_backend
from edge_moe.kernels.cpu.forms import _form_table
from tests.kernels.test_cpu_kernels import INTER, D, tokens
from tests.kernels.test_cpu_lut_form import rel
from tests.tolerances import KERNEL_INT16_ACT_REL

PLANES, NIBBLE, LUT = cpu.PLANE_FORM, cpu.NIBBLE_FORM, cpu.LUT_FORM
FORMS = (PLANES, NIBBLE, LUT)
LAYOUT = build_layout({"gate_up": (2 * INTER, D), "down": (D, INTER)}, "msb", 128)  # rows: multiples of 16


def policy(form: int, held: int, bits: int, lut: bool) -> int:
    """The form an expert in `form` holding `held` chunks takes to run at `bits`, as the runtime chose it
    before the backend owned the choice: first the form the width wants (3-4 bits: nibble form; 2 bits:
    the LUT form, but only from planes and only where the layout has it; other widths: planes rather than
    the LUT form), then planes instead of a nibble form that lacks chunks 0..3, and a nibble form stays."""
    if bits in (3, 4):
        wanted = NIBBLE
    elif bits == 2:
        wanted = LUT if lut and form == PLANES else form
    else:
        wanted = PLANES if form == LUT else form
    if wanted == NIBBLE and held < 4:
        wanted = PLANES
    return NIBBLE if form == NIBBLE else wanted


def forms_of(layout, arena, lut: bool) -> cpu.ResidentForms:
    """A ResidentForms on arena whose table has the LUT form where lut (this CPU may have none)."""
    forms = cpu.ResidentForms(layout, arena)
    forms.table = _form_table(lut)
    return forms


@pytest.mark.parametrize("lut", [False, True])
def test_table_is_the_policy_for_every_form_held_and_width(lut):
    table = _form_table(lut)
    assert table.dtype == np.int8 and table.shape == (len(FORMS), MAX_BITS + 1, MAX_BITS + 1)
    for form, held, bits in itertools.product(FORMS, range(MAX_BITS + 1), range(MAX_BITS + 1)):
        assert table[form, held, bits] == policy(form, held, bits, lut), (form, held, bits)


def test_resident_forms_table_follows_the_layout():
    arena = np.zeros((1, LAYOUT.unit_bytes), np.uint8)
    forms = cpu.ResidentForms(LAYOUT, arena)
    np.testing.assert_array_equal(forms.table, _form_table(cpu.lut_form(LAYOUT)))
    assert forms.together.dtype == np.int64 and forms.together.tolist() == [0, 4, 0]  # nibble: chunks 0..3


WANTS = [  # (form, held, widths of one call, lut) -> the one form for them all
    (PLANES, 8, [2], True, LUT), (PLANES, 8, [2], False, PLANES), (PLANES, 8, [2, 2], True, LUT),
    (PLANES, 8, [2, 3], True, NIBBLE), (PLANES, 8, [2, 8], True, PLANES), (PLANES, 8, [8, 4], True, NIBBLE),
    (PLANES, 3, [4], True, PLANES), (LUT, 8, [2], True, LUT), (LUT, 8, [2, 5], True, PLANES),
    (LUT, 8, [3], True, NIBBLE), (LUT, 2, [3], True, PLANES), (NIBBLE, 8, [2], True, NIBBLE),
    (NIBBLE, 8, [8], False, NIBBLE), (PLANES, 8, [5, 6, 8], True, PLANES),
]


@pytest.mark.parametrize("form, held, widths, lut, want", WANTS, ids=str)
def test_want_picks_one_form_for_every_width_of_a_call(form, held, widths, lut, want):
    forms = forms_of(LAYOUT, np.zeros((1, LAYOUT.unit_bytes), np.uint8), lut)
    assert forms.want(form, held, widths) == want
    widest = 4 if any(b in (3, 4) for b in widths) else max(widths)  # the nibble form serves every width
    assert want == policy(form, held, widest, lut)


def test_every_backend_answers_resident_forms():
    arena = np.zeros((8, LAYOUT.unit_bytes), np.uint8)
    for name in ("reference", "cuda"):
        assert get_backend(name).resident_forms(LAYOUT, arena) is None
    forms = cpu.resident_forms(LAYOUT, arena)
    assert (forms is not None) == cpu.nibble_form(LAYOUT)
    mwq = build_layout(dict(LAYOUT.matrices), "mwq", 128)
    assert cpu.resident_forms(mwq, arena) is None  # no forms for mwq on any CPU


def test_rewrite_to_the_same_form_leaves_the_arena():
    arena = np.arange(8 * LAYOUT.unit_bytes, dtype=np.int64).astype(np.uint8).reshape(8, -1)
    before = arena.copy()
    for form in FORMS:
        cpu.ResidentForms(LAYOUT, arena).rewrite(np.arange(8), form, form)
    np.testing.assert_array_equal(arena, before)


def _planes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(arena [10, unit bytes], units [8]): one expert of LAYOUT, its chunks in scattered units."""
    rng = np.random.default_rng(seed)
    mats = {"gate_up": rng.standard_normal((2 * INTER, D)).astype(np.float32) * 0.05,
            "down": rng.standard_normal((D, INTER)).astype(np.float32) * 0.05}
    buf = np.frombuffer(pack_expert(LAYOUT, {k: quantize(v, "msb", 128) for k, v in mats.items()}), np.uint8)
    arena, units = np.zeros((10, LAYOUT.unit_bytes), np.uint8), np.array([3, 9, 0, 5, 1, 8, 2, 6])
    arena[units] = to_units(LAYOUT, buf.copy())
    return arena, units


def _straight(form: int, units: np.ndarray) -> np.ndarray:
    """The expert rewritten from its planes into `form` in one step (to_nibble_form, to_lut_form)."""
    arena, _ = _planes()
    if form == NIBBLE:
        cpu.to_nibble_form(LAYOUT, arena, units)
    elif form == LUT:
        cpu.to_lut_form(LAYOUT, arena, units)
    return arena


CALLS = [[2], [2, 2], [5], [2], [3, 8], [2]]  # widths per call: LUT, LUT, planes, LUT, nibble, nibble
STEPS = [1, 3] if cpu.nibble_form(LAYOUT) else []  # tokens per call; the forms exist on AVX2 without AVX-512


@pytest.mark.parametrize("t", STEPS)
def test_rewrites_through_resident_forms_run_as_the_forms_made_from_planes(t):
    """A run of calls whose widths move an expert planes -> LUT -> planes -> LUT -> nibble form: after each
    rewrite (want, then rewrite) the arena equals the expert rewritten straight from its planes, and the
    layer call on it equals the same call on the planes (back from the LUT form), on that straight LUT form,
    or is within the kernels' tolerance of the planes' (nibble form: other kernels, the same arithmetic)."""
    arena, units = _planes()
    planes = arena.copy()
    forms, form = cpu.resident_forms(LAYOUT, arena), PLANES
    x = tokens(t, D, seed=t)
    ptr, tok, w = np.array([0, t]), np.arange(t), np.linspace(0.5, 1, t).astype(np.float32)
    seen = []
    for widths in CALLS:
        new = forms.want(form, MAX_BITS, widths)
        forms.rewrite(units, form, new)
        form = new
        seen.append(form)
        straight = _straight(form, units)
        np.testing.assert_array_equal(arena, straight)
        for b in widths:
            got = cpu.moe_ffn_units(LAYOUT, arena, units[None], [b], x, ptr, tok, w, form=[form])
            want = cpu.moe_ffn_units(LAYOUT, planes if form != LUT else straight, units[None], [b], x, ptr, tok,
                                     w, form=[form if form == LUT else PLANES])
            if form == NIBBLE:
                assert rel(got, want) < KERNEL_INT16_ACT_REL, (widths, b)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{widths} {b}")
    assert seen == [LUT, LUT, PLANES, LUT, NIBBLE, NIBBLE]
