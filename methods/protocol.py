"""The method contract, stated once: what the trainer, the studies and ``launch export`` may ask of a method.

Every method is an ``nn.Module`` that implements ``MethodProtocol``: ``forward(batch)`` returns a
dict of scalars with a ``"loss"`` (the trainer calls backward and logs the mean of every key).
The rest is optional; each hook is a small protocol of its own, and whoever uses it asks with
``isinstance(model, Hook)`` (``issubclass`` for a registered class):

- ``StepHook.on_step_end(step, total_steps)``: the trainer, after each optimizer step (an EMA
  teacher's update);
- ``Initializes.initialize()``: the trainer, for a run that starts now, not a resume (pretrained
  weights);
- ``ChecksClasses.check_classes(classes)``: the trainer, with an image folder's class names;
- ``Predicts.predict(images)``: the trainer and evaluation (an ``eval`` section needs it);
- ``NoWeightDecay.no_weight_decay()``, ``NumberedLayers.group_matcher(coarse)``: the optimizer
  (names kept from weight decay; timm's layer-wise learning-rate decay);
- ``HasEncoder.encoder_state(state, which)``, a staticmethod: ``launch export`` and fine-tuning
  sources, the encoder of a checkpoint of this method (the run's recorded ``method.name`` picks it);
- ``PretrainingMethod``: ``HasEncoder`` plus ``patch_tokens(images, depth)`` and ``embed(images)``, the
  methods a study may compare (``registry.pretraining_methods``);
- ``HasTeacher.teacher_patch_tokens(images)``: a study probes the EMA teacher too.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

EncoderChoice = Literal["student", "teacher"]


@runtime_checkable
class MethodProtocol(Protocol):
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalars of one micro-batch: ``"loss"``, which the trainer backpropagates, and any to log."""
        ...


@runtime_checkable
class StepHook(Protocol):
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (1-based) of ``total_steps``."""
        ...


@runtime_checkable
class Initializes(Protocol):
    def initialize(self) -> None:
        """Initial weights of a run that starts now; a resume finds them in its checkpoint."""
        ...


@runtime_checkable
class ChecksClasses(Protocol):
    def check_classes(self, classes: list[str]) -> None:
        """Raise ``ValueError`` for a training set whose classes this model cannot take."""
        ...


@runtime_checkable
class Predicts(Protocol):
    def predict(self, images: Tensor) -> Tensor:
        """What evaluation scores: logits or regression outputs ``[B, K]``."""
        ...


@runtime_checkable
class NoWeightDecay(Protocol):
    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimizer does not decay (besides 1-D ones)."""
        ...


@runtime_checkable
class NumberedLayers(Protocol):
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping, for layer-wise learning-rate decay."""
        ...


@runtime_checkable
class HasEncoder(Protocol):
    @staticmethod
    def encoder_state(state: dict[str, Tensor], which: EncoderChoice = "student") -> dict[str, Tensor]:
        """The encoder's weights in a state dict of this method, under ``ViTEncoder``'s key names.

        ``ValueError`` for a ``which`` the method does not have (a teacher).
        """
        ...


@runtime_checkable
class PretrainingMethod(MethodProtocol, HasEncoder, Protocol):
    def patch_tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        """The encoder's normalised patch tokens for all patches, in grid order ``[B, N, D]``; after its
        first ``depth`` blocks when a probe reads an inner layer (``probe.depth``)."""
        ...

    def embed(self, images: Tensor) -> Tensor:
        """One embedding per image ``[B, D]``."""
        ...


@runtime_checkable
class HasTeacher(Protocol):
    def teacher_patch_tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        """The EMA teacher's patch tokens ``[B, N, D]`` (after ``depth`` blocks), probed next to the encoder's."""
        ...
