"""What every weight adapter layer shares: the frozen base layer, which adapters are active, merging.

A method's layer subclasses :class:`AdapterLayer` and supplies the math: ``update_layer`` (create one
named adapter), ``get_delta_weight`` (the adapter as a dense update of the base weight) and ``forward``.
Per-adapter tensors live in ``nn.ModuleDict``/``nn.ParameterDict`` attributes keyed by adapter name, listed
in ``adapter_layer_names``; the key scheme (``<module>.lora_A.<adapter>.weight``) is PEFT's, which is what
makes the state-dict names of both libraries line up.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.features import in_out_features
from deltatune.errors import ConfigError, MergeError
from deltatune.quantization import dequantize_weight, is_quantized_layer, requantize_like


def peft_layer_type(base: nn.Module) -> str:
    """PEFT's layer class for an adapter over ``base``: the base's own type name (``Linear``, ``Embedding``,
    ``Conv2d``, bitsandbytes' ``Linear4bit``/``Linear8bitLt``, ...), except transformers' ``Conv1D`` (GPT-2's
    linear layer with a transposed weight), which PEFT adapts with its ``Linear`` class."""
    name = type(base).__name__
    return "Linear" if name == "Conv1D" else name


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` (frozen) and holds any number of named adapters for it.

    Attributes:
        adapter_layer_names: Attribute names of the per-adapter trainable containers.
        other_param_names: Attribute names of per-adapter plain dicts (rank, scaling...).
        active_adapters: Adapters applied in ``forward``, in order.
        merged_adapters: Adapters currently folded into ``base_layer.weight``.
        disable_adapters: When ``True``, ``forward`` is the base layer's alone.
        quantized: The base is a bitsandbytes ``Linear4bit``/``Linear8bitLt`` (QLoRA): its weight is read
            through dequantisation, written back by requantising (lossy), and a merged unload returns a
            dense ``nn.Linear`` (exact).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    owns_children = True  # its submodules are adapter internals, never targets (core.targeting reads this)
    # How PEFT names this layer in ``repr`` (and so in ``get_layer_status``' ``module_type``): "<package>.<class>",
    # e.g. "lora.Linear". ``peft_package`` None: the method's room (``deltatune.<package>...``), as PEFT's
    # packages are named alike; "" for methods whose PEFT layers print bare (IA3). ``peft_class_name`` None: PEFT's
    # class for the base layer's type (Linear, Embedding, Conv2d, Linear4bit, ...).
    peft_package: str | None = None
    peft_class_name: str | None = None
    # What PEFT's safe_merge message calls a non-finite merged bias: "weights" (LoRA) or "bias" (IA3)
    nan_bias_noun: str = "weights"
    # False inside ``deltatune.helpers.disable_input_dtype_casting``: the adapter's input keeps its dtype (for
    # forward hooks that cast the weights themselves, as diffusers' layerwise casting does)
    cast_input_dtype_enabled: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str] | None = None  # set by PeftModel for one mixed-adapter batch
        # per-row inputs of one call (``task_ids``: one entry per input row), set by PeftModel for the call as
        # row_adapters is; read through row_input by the methods that need them (Poly's router)
        self.row_inputs: dict[str, torch.Tensor] = {}
        self.quantized = is_quantized_layer(base_layer)
        # adapter -> names in adapter_layer_names that stay frozen even when it trains (MiCA's B; PEFT's
        # frozen_peft_weight_names)
        self.frozen_adapter_weights: dict[str, tuple[str, ...]] = {}
        # PEFT's layers all carry their base layer's features (code inspects them generically); a method that
        # reads its shapes another way sets its own after this
        self.in_features, self.out_features = in_out_features(self.get_base_layer())

    # ---- bookkeeping -------------------------------------------------------------------------
    def _get_name(self) -> str:
        """The name ``repr`` prints for this module: PEFT's ("lora.Linear"), so printed models and
        ``get_layer_status``' ``module_type`` read as PEFT's."""
        package = self.peft_package
        if package is None:  # the method's room, deltatune.<package>.<file>; a layer class defined elsewhere: bare
            parts = type(self).__module__.split(".")
            package = parts[1] if parts[0] == "deltatune" and len(parts) > 2 else ""
        name = self.peft_class_name or peft_layer_type(self.get_base_layer())
        return f"{package}.{name}" if package else name

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        # transformers and user code read `.weight` of the module they think is a Linear.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def get_base_layer(self) -> nn.Module:
        """The layer that was adapted, looking through adapter layers stacked on it (PEFT's ``get_base_layer``)."""
        layer: nn.Module = self
        while isinstance(getattr(layer, "base_layer", None), nn.Module):
            layer = layer.base_layer
        return layer

    @property
    def active_adapter(self) -> list[str]:
        """PEFT's name for the active adapters (a list once ``set_adapter`` ran, as PEFT's layers hold it); change it
        with ``set_adapter``."""
        return self.active_adapters

    @property
    def _active_adapter(self) -> list[str]:
        """PEFT's storage name for the active adapters (its tests set it to fake an inconsistent layer)."""
        return self.active_adapters

    @_active_adapter.setter
    def _active_adapter(self, value: str | list[str]) -> None:
        self.active_adapters = [value] if isinstance(value, str) else list(value)

    @property
    def frozen_peft_weight_names(self) -> dict[str, tuple[str, ...]]:
        """PEFT's name for :attr:`frozen_adapter_weights`: adapter -> containers that stay frozen when it trains."""
        return self.frozen_adapter_weights

    def get_base_weight(self) -> torch.Tensor:
        """The base layer's weight as a dense tensor (dequantised for a 4/8-bit base), as PEFT's
        ``get_base_weight``; ``(out, in)`` for ``nn.Linear``."""
        return self.read_base_weight()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Write ``weight`` (the layout :meth:`get_base_weight` returns) into the base layer; a quantised base is
        requantised (lossy by its format's rounding)."""
        self.write_base_weight(weight)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether this layer's adapter is an additive weight update ``W' = W + ΔW`` that plain LoRA can hold
        (PEFT's check before converting an adapter to LoRA). Methods whose layers are so say ``True``."""
        return False

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on (or off) for the tensors of ``adapter_names`` on this layer, leaving the other adapters
        alone; containers an adapter keeps frozen by design (:attr:`frozen_adapter_weights`) stay frozen."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if container is None:
                continue
            for key, item in container.items():
                if key not in names:
                    continue
                keep_frozen = requires_grad and attr in self.frozen_adapter_weights.get(key, ())
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for p in params:
                    p.requires_grad_(requires_grad and not keep_frozen)

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter name this layer holds anything for (tensors or per-adapter settings), sorted (PEFT's)."""
        names: set[str] = set()
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if hasattr(container, "keys"):
                names.update(container.keys())
        return sorted(names)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for name in getattr(self, attr):
                if name not in names:
                    names.append(name)
        return names

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        """Make ``adapter_names`` the active adapters; only those can get gradients."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        frozen = getattr(self, "frozen_adapter_weights", {})
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, item in container.items():
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for p in params:
                    p.requires_grad_(trainable and key in names and attr not in frozen.get(key, ()))
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Switch this layer's adapters on or off. As PEFT's layers: off freezes their tensors (no step may move an
        adapter that does not run), on makes the active adapters trainable again."""
        if not enabled and self.merged:
            self.unmerge()
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            self.set_requires_grad(self.adapter_names(), False)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop every tensor of ``adapter_name`` from this layer (the memory goes with it)."""
        if adapter_name in self.merged_adapters:
            self.unmerge()
        self._clear_row_cache()  # cached per-row stacks may hold this adapter's tensors
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        getattr(self, "frozen_adapter_weights", {}).pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def _clear_row_cache(self) -> None:
        """Drop whatever a mixed-adapter batch cached (LoRA's stacked factors); called on every add, delete,
        load and base-weight write, and by ``PeftModel`` when a mixed-adapter call ends."""

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._clear_row_cache()  # load_state_dict / set_peft_model_state_dict-like loads change the tensors
        super()._load_from_state_dict(*args, **kwargs)

    def _place_adapter(self, adapter_name: str) -> None:
        """Put ``adapter_name``'s new tensors on the base weight's device; keep them fp32 over a half-precision
        base (small adapters train badly in fp16/bf16, and PEFT upcasts them the same way)."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    container[adapter_name] = nn.Parameter(item.data.to(weight.device, dtype),
                                                           requires_grad=item.requires_grad)
                else:
                    item.to(weight.device, dtype)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Pick the path, run it: the base alone (adapters disabled; merged ones are unmerged first), each row
        through its own adapter (a mixed-adapter batch, ``row_adapters``), the base whose weight already holds
        the merged adapters, or :meth:`forward_adapters` (the method's math). ``x: (batch, ...)``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            if self.merged:  # merged weights would run every row through the merged adapters
                raise ConfigError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                  "`unmerge_adapter` first. (mixed-adapter batches need unmerged adapters.)")
            return self._forward_rows(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.forward_adapters(x, *args, **kwargs)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output with every active (unmerged, enabled) adapter applied: the method's equation.
        :meth:`forward` has already handled disabled adapters, mixed-adapter batches and merged weights."""
        raise NotImplementedError

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Mixed-adapter batch (``self.row_adapters``, one name per row of ``x``'s first axis, ``"__base__"``
        for none): each group of rows runs ``forward`` with only its adapter active, then rows are put back.

        A generic path for layers without a batched kernel of their own; one forward per distinct name.
        """
        given, names = self.row_adapters, self._row_names(x.shape[0])
        active, inputs = self.active_adapters, self.row_inputs
        per_row = {key: self.row_input(key, x.shape[0]) for key in inputs}  # the rows' own inputs go with them
        self.row_adapters = None
        out = None
        try:
            for name in dict.fromkeys(names):
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
                self.active_adapters = [] if name == "__base__" else [name]
                self.row_inputs = {key: value[rows.to(value.device)] for key, value in per_row.items()}
                y = self.forward(x.index_select(0, rows), *args, **kwargs)
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out[rows] = y
        finally:
            self.active_adapters, self.row_adapters, self.row_inputs = active, given, inputs
        return out

    def _row_names(self, batch: int) -> list[str]:
        """One adapter name per row of a mixed batch of ``batch`` rows: ``row_adapters``, each entry repeated
        where ``generate()`` expanded every input row (``num_beams``, ``num_return_sequences``)."""
        names = self.row_adapters
        if batch % len(names):
            raise ConfigError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                              f"{len(names)} and {batch} respectively. (Or a divisor of it, as generate() expands "
                              "each input row: give one adapter name per input row.)")
        repeat = batch // len(names)
        return [n for n in names for _ in range(repeat)]

    def row_input(self, key: str, batch: int) -> torch.Tensor | None:
        """The call's per-row input ``key`` (``task_ids``: one entry per input row, given to ``PeftModel``'s
        forward or generate) for a batch of ``batch`` rows, each entry repeated where ``generate()`` expanded
        every input row, as :meth:`_row_names` does; ``None`` when the call gave none.

        Raises:
            ConfigError: its length does not divide ``batch``.
        """
        values = self.row_inputs.get(key)
        if values is None:
            return None
        if values.shape[0] == 0 or batch % values.shape[0]:
            raise ConfigError(f"{key} has {values.shape[0]} entries for a batch of {batch} rows; give one per row "
                              "(or one per input row of generate())")
        return values.repeat_interleave(batch // values.shape[0], dim=0)

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter as ``ΔW``, shaped like ``base_layer.weight``."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight`` with the adapter folded in; methods that are not additive override this."""
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    def read_base_weight(self) -> torch.Tensor:
        """The base weight as a dense float tensor in its storage layout (dequantised ``(out, in)`` fp32 for a
        quantised base)."""
        return dequantize_weight(self.base_layer) if self.quantized else self.base_layer.weight.data

    def write_base_weight(self, weight: torch.Tensor) -> None:
        self._clear_row_cache()  # a `.data` write does not bump the tensor's version
        if self.quantized:  # requantise: lossy by the format's rounding (int8 refuses)
            self.base_layer.weight = requantize_like(self.base_layer.weight, weight)
        else:
            self.base_layer.weight.data = weight.contiguous()

    def _dequantize_base(self) -> torch.dtype:
        """Replace a quantised base by a dense fp32 ``nn.Linear`` holding its dequantised weight and bias.

        Returns the dtype the unloaded layer should end in (the 4-bit layer's compute dtype, else fp32).
        """
        base = self.base_layer
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        weight = dequantize_weight(base)
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        linear.weight.data = weight
        if base.bias is not None:
            linear.bias.data = base.bias.data.to(torch.float32).clone()
        linear.requires_grad_(False)
        self.base_layer = linear
        self.quantized = False
        return dtype

    def unloaded(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The plain module that replaces this wrapper on unload (merged first if ``merge``).

        Over a quantised base a merged unload is exact: the base is dequantised to fp32 first, the adapters
        are folded in there, and the result is a dense ``nn.Linear`` in the base's compute dtype
        (:func:`deltatune.quantization.quantize` can requantise the whole model afterwards).
        """
        if merge and self.quantized:
            self.unmerge()  # an in-place (lossy) 4-bit merge is undone before the exact one
            dtype = self._dequantize_base()
            self.merge(adapter_names=adapter_names)
            return self.base_layer.to(dtype)
        if merge:
            self.merge(adapter_names=adapter_names)
        else:
            self.unmerge()
        return self.base_layer

    def check_merge(self, adapter_names: list[str] | None = None, where: str = "") -> None:
        """Raise :class:`MergeError` (a ``ValueError``, as PEFT's) if merging would put NaN/Inf into the weight or
        the bias; changes nothing.

        The adapters are merged in turn on copies, as :meth:`merge` would merge them, so a sum that overflows only
        once two adapters are in is caught too; every tensor the merge writes is checked (:meth:`merged_weight`
        and :meth:`merged_bias`).
        """
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n not in self.merged_adapters and n in self.adapter_names()]
        if not names:
            return
        base_bias = getattr(self.base_layer, "bias", None)
        bias = None if base_bias is None else base_bias.detach()
        try:
            with torch.no_grad():
                weight = self.read_base_weight().clone()
                for name in names:
                    weight = self.merged_weight(weight, name)
                    new_bias = self.merged_bias(bias, name)
                    if not torch.isfinite(weight).all():
                        what = "weight"
                    elif new_bias is not None and not torch.isfinite(new_bias).all():
                        what = "bias"
                    else:
                        bias = bias if new_bias is None else new_bias
                        continue
                    # PEFT's sentence first (code written for PEFT matches it); IA3 names the bias, LoRA does not
                    noun = "bias" if what == "bias" and self.nan_bias_noun == "bias" else "weights"
                    raise MergeError(
                        f"NaNs detected in the merged {noun}. The adapter {name} seems to be broken: merging it into "
                        f"{where or type(self.base_layer).__name__} would put NaN/Inf in the {what}; check its "
                        "training, nothing was merged"
                    )
        finally:
            for name in names:
                self._forget_merge_state(name)

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """The base bias with ``adapter_name`` merged in, as a new tensor (``bias`` is not changed), or ``None`` when
        merging it leaves the bias alone. Methods whose merge writes the bias override this, so that ``safe_merge``
        checks what would be written."""
        return None

    def _forget_merge_state(self, adapter_name: str) -> None:
        """Drop what :meth:`merged_weight` cached for an unmerge that will not happen."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the (active) adapters into the base weight; ``forward`` then costs the base layer alone.

        Args:
            safe_merge: Compute the merged weight on a copy first and refuse NaN/Inf, leaving the layer
                unchanged.
            adapter_names: Which adapters; default the active ones.
        """
        if safe_merge:
            self.check_merge(adapter_names)
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names():
                continue
            with torch.no_grad():
                self.write_base_weight(self.merged_weight(self.read_base_weight(), name))
                self._merge_bias(name, +1)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge`, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.write_base_weight(self.unmerged_weight(self.read_base_weight(), name))
                self._merge_bias(name, -1)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        """Hook for adapters that also carry a bias (LoRA's ``lora_bias``)."""
