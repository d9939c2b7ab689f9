"""Tolerances for float32 model outputs that two code paths compute in a different order.

Which paths differ: a padded batch and a lone prompt have different shapes, and 1 or 2 threads (or
AVX2 instead of AVX-512/AMX kernels) split the same sums differently, so the results agree only to
float32 rounding. A test that compares such paths uses these constants; a test that compares the
same computation (same shapes, same threads, same process) may ask for equality and says so.

Derivation (float32 unit roundoff u = 2**-24 = 6.0e-8):
- One dot product of length d has a rounding error of about sqrt(d) * u relative to |a| |b| (a random
  walk; the worst case is d * u). The longest inner dimension in SmolLM2 is the MLP's 1536, and an
  error entering the residual stream in one layer is carried through the rest, so after L = 30
  layers the relative error of an activation is about sqrt(L * 1536) * u = 1.3e-5.
- An attention score q.k of magnitude |s| (up to ~10 here) then moves by ~1.3e-4, and a softmax
  probability p moves by at most 2 p |ds|: at most ~2.6e-4 p for p in [0, 1], and in practice far
  less (we see up to 2.1e-6). ``ATTENTION_ATOL = 1e-4`` is that scale: 50x what we observe, and
  100x below the smallest effect these tests look for (attention leaking onto a pad, a shifted
  label position: 1e-2 or more).
- A label mass (S, S_plus, S_minus, correct minus wrong) is a sum of k = 4 such values, and a mean
  over prompts does not grow the error: ``MASS_ATOL = 4e-4``. Standard errors inherit the same
  absolute error. Values near zero (a correctness of -0.007) are compared absolutely, never
  relatively.
- A pass rate counts prompts whose mass is above a threshold; a prompt within rounding of the
  threshold can fall either way, so pass rates agree to one prompt: ``1 / n_prompts``.
"""

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
ATTENTION_ATOL = 1e-4
MASS_ATOL = 4 * ATTENTION_ATOL
