"""The few-row products tuning runs on: the compiled kernels against torch's own, on every shape they split."""

from pathlib import Path

import pytest
import torch
from conftest import kernels_on, needs_kernels

from stylegrad.aesthetic import products
from stylegrad.aesthetic.adam import AdamSettings

# shapes that reach every branch of _fewrows.c: token counts around its blocks of 3, 6 and 12, weights whose sides
# are and are not multiples of its 4-row blocks and 8-, 16- and 32-column strips, more than one panel of rows,
# and the 1024-column chunks of the forward product
ROWS = [1, 2, 3, 4, 5, 6, 7, 12, 13, 17, 25, 40, 77]
SHAPES = [(768, 768), (300, 1100), (37, 32), (32, 37), (5, 3), (4, 2100), (40, 48)]


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Each test that takes this runs on both instruction sets' kernels (AVX-512 where the CPU has it)."""
    yield from kernels_on(request.param)


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_kernels_match_torch(out_features, in_features, isa):
    g = torch.Generator().manual_seed(out_features * 7 + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=g)
        grad = torch.randn(rows, out_features, generator=g)
        scale = in_features ** 0.5 * 1e-5  # float32 sums in another order
        assert torch.allclose(products.linear(x, w, b), x @ w.T + b, rtol=1e-5, atol=scale)
        assert torch.allclose(products.linear(x, w), x @ w.T, rtol=1e-5, atol=scale)
        assert torch.allclose(products.input_grad(grad, w), grad @ w, rtol=1e-5, atol=out_features ** 0.5 * 1e-5)


def test_kernels_take_views_and_leave_their_inputs_alone():
    needs_kernels()
    w = torch.randn(64, 48)
    x = torch.randn(48, 10).T  # a transposed view: copied to rows first
    grad = torch.randn(20, 64)[::2]
    before = (w.clone(), x.clone(), grad.clone())
    assert torch.allclose(products.linear(x, w), x @ w.T, atol=1e-5)
    assert torch.allclose(products.input_grad(grad, w), grad @ w, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip((w, x, grad), before))


def test_kernels_share_torchs_threads():
    """One OpenMP runtime in the process (the module shares the libgomp torch loaded), and the same results
    whether torch.set_num_threads gives the kernels one thread or two."""
    needs_kernels()
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(runtimes) == 1, runtimes  # torch's, which the kernels share (a second one would be a bug)
    threads = torch.get_num_threads()
    w, x = torch.randn(256, 128), torch.randn(17, 128)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.allclose(products.linear(x, w), x @ w.T, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kept", [True, False])
def test_rows_give_the_same_bits_on_any_number_of_threads(isa, kept):
    """The forward product and the Adam step hand their rows out to whichever thread is free, 64 at a time: a
    row's numbers must not depend on which thread took it or how many there were (kept and rebuilt moments,
    several chunks and a short last one, leftover rows past the 4-row blocks)."""
    adam = AdamSettings(lr=1e-3)
    g = torch.Generator().manual_seed(5)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = []
            for o, k in ((300, 1100), (142, 96)):  # 64 + 64 + 64 + 64 + 44 rows; 64 + 64 + 12 and 2 left over
                g.manual_seed(o)
                w, b = 0.02 * torch.randn(o, k, generator=g), torch.randn(o, generator=g)
                x, gp, xp = (torch.randn(17, d, generator=g) for d in (k, o, k))
                copy = torch.empty_like(w)
                if kept:
                    m, v = (t.zero_() for t in products.empty_moments(w))
                    y = products.fused_adam_linear(w, copy, m, v, gp, xp, x, b, first=True, keep=True, step=1, adam=adam)
                    y2 = products.fused_adam_linear(copy, copy, m, v, gp, xp, x, b, first=False, keep=True, step=2,
                                                    adam=adam)
                    out += [y, y2, copy, *products.moment_values(m, v, w)]
                else:
                    history = [(torch.randn(17, o, generator=g), torch.randn(17, k, generator=g)), (gp, xp)]
                    y = products.fused_adam_linear(w, copy, None, None, gp, xp, x, b, first=True, keep=False, step=2,
                                                   adam=adam, history=history)
                    out += [y, copy]
                out.append(products.linear(x, w, b))
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_mismatched_shapes_raise_instead_of_reaching_the_kernels():
    """The kernels read through raw pointers: a mismatch must be an error, never a read past a tensor's end."""
    needs_kernels()
    w = torch.randn(64, 48)
    with pytest.raises(RuntimeError):
        products.linear(torch.randn(5, 40), w)  # torch's own shape error
    with pytest.raises(RuntimeError):
        products.input_grad(torch.randn(5, 60), w)
    m, v = (t.zero_() for t in products.empty_moments(w))
    good = dict(first=False, keep=True, step=2, adam=AdamSettings(lr=1e-3))
    x, g, xp = torch.randn(5, 48), torch.randn(3, 64), torch.randn(3, 48)
    products.fused_adam_linear(w, w, m, v, g, xp, x, None, **good)  # the right shapes run
    for bad in [dict(x_prev=torch.randn(3, 40)), dict(grad_out=torch.randn(2, 64)), dict(exp_avg=None),
                dict(exp_avg=torch.zeros(64, 40)), dict(exp_avg_sq=v[:-1]),  # another shape, one value short
                dict(exp_avg=m.view(torch.float32) if m.dtype == torch.int32 else m.view(torch.int32)),  # layout
                dict(bias=torch.zeros(60)), dict(source=torch.randn(48, 64))]:
        args = dict(source=w, weight=w, exp_avg=m, exp_avg_sq=v, grad_out=g, x_prev=xp, x=x, bias=None) | bad
        with pytest.raises(ValueError):
            products.fused_adam_linear(**args, **good)


def test_other_tensors_take_torchs_path():
    """Other dtypes, autograd inputs and many rows never reach the kernels, and still give torch's product."""
    w = torch.randn(16, 32, dtype=torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.equal(products.linear(x, w), torch.nn.functional.linear(x, w))
    wg = torch.randn(16, 32, requires_grad=True)
    y = products.linear(torch.randn(3, 32), wg)
    assert y.requires_grad  # autograd saw the product: torch's path


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_fused_adam_steps_match_torch_adam(out_features, in_features, isa):
    """Three Adam steps on the fused kernel (first: moments not read, original not written; last: moments not
    kept) against torch.optim.Adam on the full gradient: the same weights, moments and products. The 77-row
    step takes the step alone and torch's product."""
    g = torch.Generator().manual_seed(out_features * 11 + in_features)
    original = 0.02 * torch.randn(out_features, in_features, generator=g)  # the scale of CLIP's weights
    pristine, bias, lr = original.clone(), torch.randn(out_features, generator=g), 1e-3
    reference = original.clone().requires_grad_(True)
    adam = torch.optim.Adam([reference], lr=lr)
    weight, (exp_avg, exp_avg_sq) = torch.empty_like(original), products.empty_moments(original)
    for step, (factor_rows, rows) in enumerate([(17, 5), (1, 77), (6, 1)], start=1):
        grad_out = torch.randn(factor_rows, out_features, generator=g)
        grad_out[:, 0] = 0  # a row with no gradient: v = 0 must leave it in place, not make it NaN
        x_prev, x = torch.randn(factor_rows, in_features, generator=g), torch.randn(rows, in_features, generator=g)
        reference.grad = grad_out.T @ x_prev
        adam.step()
        last = step == 3
        y = products.fused_adam_linear(original if step == 1 else weight, weight, exp_avg, exp_avg_sq, grad_out,
                                       x_prev, x, bias, first=step == 1, keep=not last, step=step,
                                       adam=AdamSettings(lr=lr))
        expected = reference.detach()
        # steps of about lr, each right to 2^-14 of itself: the moments carried from the last step are packed
        # (within 2^-16) on AVX-512, float32 on AVX2; the sums and the weight are float32
        assert (weight - expected).abs().max() <= 2 ** -14 * lr * (step - 1) + 2e-8
        assert torch.allclose(y, x @ expected.T + bias, rtol=1e-5, atol=in_features ** 0.5 * 1e-5)
        if not last:
            state = adam.state[reference]
            # packed: each within 2^-16 of itself when kept, so a moment that the step's gradient nearly
            # cancelled is right to 2^-16 of the largest, not of itself
            values = products.moment_values(exp_avg, exp_avg_sq, original)
            for kept, name, rtol in zip(values, ("exp_avg", "exp_avg_sq"), (1e-5, 1e-4)):
                ref = state[name]
                assert torch.allclose(kept, ref, rtol=rtol, atol=2 ** -14 * ref.abs().max())
    assert torch.equal(weight[0], pristine[0]) and torch.equal(original, pristine)


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside, lines = False, Path("/proc/self/smaps").read_text().splitlines()
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_tuned_copies_ask_for_huge_pages():
    """The tuned weights and moments (6.3 GB for bigG on AVX-512, docs/exactness.md) are fresh memory every prompt:
    ``empty_huge`` asks Linux for 2 MB pages before the first touch, which took a quarter off SDXL's tuning time
    (fewer page faults, fewer TLB misses); with THP in its default 'madvise' mode nothing else gets them."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[madvise]" not in thp.read_text():
        pytest.skip("transparent huge pages are not in 'madvise' mode here: the advice changes nothing to observe")
    like = torch.empty(16 << 20)  # 64 MB
    t = products.empty_huge(like)
    assert t.shape == like.shape and t.dtype == like.dtype and t.is_contiguous()
    t.fill_(1.0)  # first touch: the kernel now maps huge pages where it was asked to
    assert _anon_huge_kb(t.data_ptr() + t.numel() * 2) > 0, "the tensor was not given huge pages"
    plain = torch.empty(16 << 20).fill_(1.0)
    assert _anon_huge_kb(plain.data_ptr() + plain.numel() * 2) == 0  # without the advice: 4 KB pages


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_rebuilt_moments_take_the_kept_steps_bit_for_bit(out_features, in_features, isa):
    """Four steps with the moments rebuilt from every step's factors (nothing stored but the weight) against the
    same steps with stored moments: the same weights and products to the bit, vector blocks and scalar tails."""
    g = torch.Generator().manual_seed(out_features * 13 + in_features)
    original = 0.02 * torch.randn(out_features, in_features, generator=g)
    pristine, bias, adam = original.clone(), torch.randn(out_features, generator=g), AdamSettings(lr=1e-3)
    kept, (exp_avg, exp_avg_sq) = torch.empty_like(original), products.empty_moments(original)
    rebuilt, history = torch.empty_like(original), []
    for step, rows in enumerate([5, 3, 77, 1], start=1):
        grad_out = torch.randn(17, out_features, generator=g)
        x_prev, x = torch.randn(17, in_features, generator=g), torch.randn(rows, in_features, generator=g)
        history.append((grad_out, x_prev))
        source = (original, original) if step == 1 else (kept, rebuilt)
        y_kept = products.fused_adam_linear(source[0], kept, exp_avg, exp_avg_sq, grad_out, x_prev, x, bias,
                                            first=step == 1, keep=step < 4, step=step, adam=adam)
        y_rebuilt = products.fused_adam_linear(source[1], rebuilt, None, None, grad_out, x_prev, x, bias, first=True,
                                               keep=False, step=step, adam=adam, history=history)
        assert torch.equal(kept, rebuilt) and torch.equal(y_kept, y_rebuilt), f"step {step}"
    assert torch.equal(original, pristine)


def test_rebuilt_moments_check_every_factor():
    needs_kernels()
    w, adam = torch.randn(64, 48), AdamSettings(lr=1e-3)
    x, good = torch.randn(5, 48), [(torch.randn(3, 64), torch.randn(3, 48))]
    products.fused_adam_linear(w, w, None, None, *good[0], x, None, first=True, keep=False, step=1, adam=adam,
                               history=good)
    for history in ([(torch.randn(3, 64), torch.randn(3, 40))] + good,  # an older step's factor of another width
                    [(torch.randn(2, 64), torch.randn(2, 48))] + good,  # another token count
                    [(torch.randn(64, 3).T, torch.randn(3, 48))] + good):  # not contiguous
        with pytest.raises(ValueError):
            products.fused_adam_linear(w, w, None, None, *good[0], x, None, first=True, keep=False, step=2,
                                       adam=adam, history=history)
    with pytest.raises(ValueError):  # stored moments and a history at once
        products.fused_adam_linear(w, w, *(t.zero_() for t in products.empty_moments(w)), *good[0],
                                   x, None, first=False,
                                   keep=True, step=2, adam=adam, history=good)


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_kept_moments_carry_their_high_bits(out_features, in_features, isa):
    """The kept moments are exactly Adam's first moments, each in its own place, rounded to 24 bits where the
    kernels pack them (AVX-512), whole on AVX2: one-row factors make the gradient a single product, the same in
    torch and in the kernel. A step alone (no product) then carries them on."""
    g = torch.Generator().manual_seed(out_features * 17 + in_features)
    w, adam = 0.02 * torch.randn(out_features, in_features, generator=g), AdamSettings(lr=1e-3)
    grad_out, x_prev = torch.randn(1, out_features, generator=g), torch.randn(1, in_features, generator=g)
    grad = grad_out.T * x_prev  # (out, in): every element one float32 product
    (m, v), weight = products.empty_moments(w), torch.empty_like(w)
    products.fused_adam_linear(w, weight, m, v, grad_out, x_prev, torch.randn(3, in_features, generator=g), None,
                               first=True, keep=True, step=1, adam=adam)
    c1, c2 = torch.tensor(1 - adam.beta1), torch.tensor(1 - adam.beta2)  # float32, as the kernel rounds them
    m1, v1 = c1 * grad, c2 * grad * grad
    kept = [t.clone() for t in products.moment_values(m, v, w)]  # float32 moments are views: keep these
    assert torch.equal(kept[0], products.carried(m1)) and torch.equal(kept[1], products.carried(v1))
    assert torch.equal(products.carried(m1), m1) == (isa == "avx2")  # packed: some were rounded
    assert products.fused_adam_linear(weight, weight, m, v, grad_out, x_prev, None, None, first=False, keep=True,
                                      step=2, adam=adam) is None  # the step alone
    m2 = products.carried((c1 * grad).double() + adam.beta1 * kept[0].double()).float()  # the kernel's fused
    # multiply-add rounds once: a last bit apart can land on either side of a midpoint, one carried step apart
    assert ((products.moment_values(m, v, w)[0] - m2).abs() <= 2 ** -15 * m2.abs()).all()
