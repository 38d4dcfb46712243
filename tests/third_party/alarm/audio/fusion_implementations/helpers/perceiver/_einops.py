"""Not part of ALARM: the `rearrange` / `repeat` that ALARM's vendored perceiver helpers import from `einops`.

The real `einops` is used when installed. Otherwise these torch equivalents stand in, each written out for
one pattern the vendored code uses (any other pattern raises, so nothing is silently mis-read)."""

try:
    from einops import rearrange, repeat  # noqa: F401
except ImportError:  # einops is not a dependency of alm_jax
    import torch

    def rearrange(x, pattern, **axes):
        p = " ".join(pattern.split())
        if p == "... -> 1 ...":
            return x.unsqueeze(0)
        if p == "b j -> b 1 1 j":
            return x[:, None, None, :]
        if p == "b n (h c) -> b h n c":
            b, n, hc = x.shape
            return x.reshape(b, n, axes["h"], hc // axes["h"]).permute(0, 2, 1, 3)
        if p == "b h n c -> b n (h c)":
            b, h, n, c = x.shape
            return x.permute(0, 2, 1, 3).reshape(b, n, h * c)
        if p == "b n c -> b 1 n c":
            return x[:, None]
        raise NotImplementedError(f"_einops shim: rearrange pattern {pattern!r} is not written out; install einops")

    def repeat(x, pattern, **axes):
        p = " ".join(pattern.split())
        if p == "n -> b n":
            return x[None].expand(axes["b"], *x.shape).clone()
        raise NotImplementedError(f"_einops shim: repeat pattern {pattern!r} is not written out; install einops")
