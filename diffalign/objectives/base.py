"""What the trainer may ask of any objective, with the defaults most objectives need."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffalign.errors import UserError
from diffalign.config import NoOptions, ObjectiveConfig, build_options
from diffalign.diffusion.logprob import SAMPLERS


class Objective:
    """Base of the objectives: the data layout, whether a frozen reference is needed, and two hooks.

    ``dataset`` names what the trainer loads: "pairs", "ranked", "images", "labelled_images" (one
    image with a binary label per row) or "online" (rounds sampled during training); for a language
    model "text_pairs", "text_unpaired" or "text_ranked" (:mod:`diffalign.data.text`).
    ``frozen_reference`` False tells a full fine-tune not to keep a frozen copy of the base, for
    objectives that never compare with it. ``shadow_weights``
    True marks objectives that also run the bare denoiser with other values of its trained
    weights (an EMA teacher, a round's snapshot), which needs the whole weights on each process.
    """

    online = False
    samples_in_loss = False  # True: no rounds; each micro-batch is prompts, sampled inside the loss (DRaFT, ReFL)
    family = "diffusion"  # the model family it trains: "diffusion" or "lm" (a causal language model)
    dataset = "pairs"
    frozen_reference = True
    reads_teacher = False  # True: distils from model.teacher (lm_distill, diffusion_distill)
    shadow_weights = False
    loss_kinds: tuple[str, ...] = ()
    # the losses the objective trains (None: any of loss_kinds), and the per-pair loss inputs it estimates
    # (LossSpec.inputs: SPPO's win-rates); the config matches them before any model loads
    loss_names: tuple[str, ...] | None = None
    supplies: tuple[str, ...] = ()
    # the method's own settings: a dataclass (diffalign.config.options) set under objective.options
    Options: ClassVar[type] = NoOptions
    # the paper it implements (for `diffalign methods`) and the diffusion families it trains
    paper: ClassVar[str] = ""
    # whether it combines each prediction with the empty prompt's (classifier-free guidance of a teacher): a text
    # encoder that reads the edits' sources then needs each example's own empty prompt (Conditioning.negative_embeds)
    guides: bool = False

    @classmethod
    def build(cls, config, model: Any) -> "Objective":
        """The objective a run trains, from the run's whole config and its model (a diffusion backbone, or a
        language model's tokenizer): what the trainer calls. Online objectives also take their round size here."""
        return cls(config.objective, model)

    @classmethod
    def options_of(cls, config: ObjectiveConfig) -> Any:
        """The method's options from ``config.options`` (a mapping or an instance), checked."""
        return build_options(cls.Options, config.options, config.name)

    @classmethod
    def check_config(cls, config) -> None:
        """Raise :class:`~diffalign.errors.UserError` for settings the method cannot run with (default: none); called
        with the whole config when it is validated, before any model loads, after its options were checked."""

    @staticmethod
    def mean_over_processes(value: Tensor) -> Tensor:
        """The mean of ``value`` over the data-parallel processes, so a statistic of the batch (KTO's
        reference point, BCO's reward shift) is taken over the global batch. One process: ``value``;
        the trainer replaces this with its accelerator's reduction, which every process must call alike."""
        return value

    def trained_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules the objective trains beside the model (SparsePO's token mask model), by name, given the model to
        be trained. The trainer adds them to that model as submodules before the optimiser and DDP see it, so they
        train, synchronise and checkpoint with it, and leaves them out of the final weights (default none)."""
        return {}

    def attach(self, denoiser: nn.Module) -> list[Any]:
        """Called once with the trained denoiser; returns state to save in checkpoints (default none)."""
        return []

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step that was taken (default: nothing)."""


class OnlineObjective(Objective):
    """An objective trained on rounds of its own samples (:mod:`diffalign.train.online`, the round driver).

    ``group_size`` is the samples per prompt of a round and ``shared_noise`` whether they start from one
    noise; :meth:`training_units` turns a sampled round into what the objective trains on. ``takes_labels``
    False: the objective needs a reward for every sample, human pair labels cannot replace it. ``real_data``
    True: each group is one real example of ``data.path`` (read in the ``real_layout``), its caption or prompt the
    group's prompt (DDO, DRIFT), and
    ``scored`` False: the samples need no reward or label. ``keeps_trajectories`` False: the round keeps
    only the clean samples, not every step of their trajectories, and may sample them with the deterministic
    sampler (``objective.sample_eta=0``). ``samples_in_loss`` True: the method samples inside its loss, with
    gradients (:mod:`diffalign.objectives.reward_gradient`), so its batches are prompts and noise
    (:mod:`diffalign.train.prompt_batches`), not rounds. ``keeps_step_means`` True: the round records each
    step's Gaussian mean as well (GRPO-Guard's ratio). ``steps_per_round`` is the run's
    ``online.steps_per_round``, which :meth:`build` reads with the rest of the config.
    """

    online = True
    dataset = "online"
    group_size = 2
    shared_noise = True
    takes_labels = True  # people's pair labels can stand in for the reward
    group_size_fixed = False  # True: the method is defined for groups of exactly group_size (D3PO's pairs)
    real_data = False
    real_layout = "images"  # the layout real_data objectives read data.path in (:data:`diffalign.data.layouts.LAYOUTS`)
    scored = True
    keeps_trajectories = True
    keeps_step_means = False
    whole_groups = False  # True: a batch is whole groups (DGPO); train.batch_size a multiple of the group size
    steps_per_round = 1

    @classmethod
    def round_group_size(cls, config) -> int:
        """The samples per prompt of the run's rounds: ``online.group_size``, else the method's own."""
        return config.online.group_size or cls.group_size

    def starting_noises(self, group_size: int) -> int:
        """How many distinct starting noises a group of ``group_size`` samples draws (each shared by an equal block
        of the group, in order): one each (the default; ``shared_noise`` makes it one for the group)."""
        return group_size

    def stochastic_steps(self, r: int, candidates: Tensor, steps: int) -> Tensor | None:
        """(steps,) bool: the sampler steps of round r that draw noise, where the method chooses them
        (TempFlow-GRPO's branching step); ``candidates`` are the steps it may train (in ``objective.t_range``, of
        the trained expert). None: the run's ``online.sde_window`` chooses (every step without one)."""
        return None

    @classmethod
    def check_config(cls, config) -> None:
        """The rules every online method shares (a source of prompts or real images, exactly one source of
        preferences when it needs one, group sizes), then how its rounds are sampled (:meth:`check_sampling`). A
        method with rules of its own adds them after ``super().check_config(config)``."""
        oc = config.online
        if cls.real_data and not config.data.path:
            raise UserError(f"{config.objective.name} pairs real images with its samples: set data.path to a "
                            "table of captioned images")
        if not cls.real_data and not oc.prompts:
            raise UserError(f"{config.objective.name} samples in rounds: set online.prompts to a prompt file or "
                            "set")
        if not cls.scored and (oc.reward is not None or oc.labels is not None):
            raise UserError(f"{config.objective.name} needs no reward or label (its real images are the positives, "
                            "its samples the negatives): remove online.reward and online.labels")
        if cls.scored and (oc.reward is None) == (oc.labels is None):
            raise UserError("online objectives need exactly one source of preferences: online.reward (a reward "
                            "model spec) or online.labels (a JSON-lines file of human labels)")
        if oc.reward == []:
            raise UserError("online.reward is an empty list: name at least one reward model")
        if oc.reward is not None and cls.round_group_size(config) < 2:
            from diffalign.rewards import REWARDS, RewardSpec
            from diffalign.rewards.weighted import reward_specs

            names = [RewardSpec.parse(spec).name for spec in reward_specs(oc.reward)]  # each a known reward
            pairwise = [name for name in names if getattr(REWARDS[name], "pairwise", False)]
            if pairwise:
                raise UserError(f"{', '.join(pairwise)} compares the images of a group, and this run's groups hold "
                                "one image: set online.group_size >= 2, or use a pointwise reward")
        if oc.labels is not None and not cls.takes_labels:
            raise UserError(f"{config.objective.name} needs a reward for every sample (online.reward); human "
                            "labels of pairs give no group-relative advantages")
        if cls.group_size_fixed and oc.group_size not in (None, cls.group_size):
            raise UserError(f"{config.objective.name} is defined for groups of {cls.group_size}: "
                            f"online.group_size must be {cls.group_size} (or empty), got {oc.group_size}")
        if oc.group_size is not None and oc.group_size < 2:
            raise UserError(f"online.group_size must be >= 2 (a group compares its samples), got {oc.group_size}")
        if cls.whole_groups and config.train.batch_size % cls.round_group_size(config):
            raise UserError(f"{config.objective.name} compares whole groups within a batch: train.batch_size="
                            f"{config.train.batch_size} must be a multiple of the group size "
                            f"{cls.round_group_size(config)} (online.group_size)")
        cls.check_sampling(config)

    @classmethod
    def check_sampling(cls, config) -> None:
        """Image rounds: their sizes, the SDE window within the sampler's steps, the reward models and their
        weights, a stochastic sampler."""
        from diffalign.rewards.weighted import parse_weights, reward_names

        oc = config.online
        for key in ("groups_per_round", "steps_per_round", "sample_batch_size", "sde_window_stride"):
            if getattr(oc, key) < 1:
                raise UserError(f"online.{key} must be >= 1, got {getattr(oc, key)}")
        steps = config.objective.sample_steps
        if oc.sde_window < 0 or oc.sde_window_shift_every < 0 or not 0 <= oc.sde_window_start < steps \
                or oc.sde_window_start + oc.sde_window > steps:
            raise UserError(f"online.sde_window={oc.sde_window} from "
                            f"online.sde_window_start={oc.sde_window_start} must fit in the sampler's {steps} steps (objective.sample_steps), and "
                            f"online.sde_window_shift_every={oc.sde_window_shift_every} must be >= 0")
        names = reward_names(oc.reward)
        if len(set(names)) != len(names):
            raise UserError(f"online.reward names a reward model twice ({', '.join(names)})")
        parse_weights(len(names), oc.reward_weights)
        if oc.reward_as not in ("score", "win_rate"):
            raise UserError(f"online.reward_as={oc.reward_as!r}: choose score or win_rate")
        if oc.reward_as == "win_rate" and cls.round_group_size(config) < 2:
            raise UserError("online.reward_as=win_rate compares each sample with the rest of its group: "
                            "online.group_size must be >= 2")
        if config.objective.sample_eta <= 0 and cls.keeps_trajectories:
            raise UserError(f"objective.sample_eta must be > 0: {config.objective.name} trains on the sampler's "
                            "step log-probabilities, and a deterministic sampler has none")
        if config.objective.sampler not in SAMPLERS:
            raise UserError(f"objective.sampler={config.objective.sampler!r}: choose one of {', '.join(SAMPLERS)}")

    @classmethod
    def build(cls, config, model: Any) -> "OnlineObjective":
        objective = super().build(config, model)
        objective.steps_per_round = config.online.steps_per_round
        return objective

    def choose_units(self, units: int, trained_steps: Tensor, n: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(unit indices (n,), denoising steps (n,)) of the n units of one micro-step's global batch, among a round's
        ``units`` and the steps it trains (``trained_steps``), drawn with ``generator`` so resume is exact. By default
        random units, each at a random trained step; the processes take consecutive slices of n."""
        chosen = torch.randint(0, units, (n,), generator=generator)
        return chosen, trained_steps[torch.randint(0, len(trained_steps), (n,), generator=generator)]

    def draw(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """Randomness of n units beyond their denoising step (drawn by the round driver, so resume is exact)."""
        return {}

    def record_sampler(self, config: ObjectiveConfig, backbone) -> None:
        """Keep the rounds' sampler settings (eta, guidance scale, the step rule and, when guided, the empty prompt's
        conditioning), which objectives that re-score recorded steps need: the guided step is the policy."""
        self.eta, self.guidance_scale, self.sampler = config.sample_eta, config.sample_guidance_scale, config.sampler
        self.uncond = backbone.empty_prompt() if self.guidance_scale != 1.0 else None

    def sampler_settings(self, n: int, device: torch.device) -> dict[str, Any]:
        """The keyword arguments of :func:`~diffalign.diffusion.logprob.step_log_prob` and ``step_distribution``
        for n recorded steps on ``device``: the sampler's eta, guidance scale, step rule and unconditional branch."""
        uncond = None if self.uncond is None else self.uncond.to(device).repeat_items(n)
        return {"eta": self.eta, "guidance_scale": self.guidance_scale, "uncond": uncond, "sampler": self.sampler}

    def sampling_denoiser(self) -> nn.Module | None:
        """The denoiser that samples the rounds; None: the policy being trained."""
        return None

    def training_units(self, round_) -> dict[str, Any]:
        """The round's units: ``latents`` (N, ...) indexed by unit, ``prompt_of`` (N,) each unit's prompt (an index
        into the round's prompts), and ``targets``, a dict of (N, ...) tensors handed to the objective with
        each unit (advantages, recorded log-probabilities); optionally ``logged``, scalars logged with every step
        trained on the round (how many pairs a selection rule kept)."""
        raise NotImplementedError


def data_layout(objective: type) -> str | None:
    """The layout an objective reads ``data.path`` in (:data:`diffalign.data.layouts.LAYOUTS`): its dataset's, an
    online objective's ``real_layout`` when it pairs real examples with its samples (DDO, DRIFT), else None (an online
    objective that reads only prompts)."""
    if objective.dataset != "online":
        return objective.dataset
    return objective.real_layout if objective.real_data else None
