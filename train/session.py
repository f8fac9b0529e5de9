"""One training run as a recipe: `TrainingSession(config)` is cheap; `setup()` builds the run from `_setup_*` steps
(outputs, data, models, loss, DeepSpeed engine, resume, report); `loss_step()` is one micro-batch's forward;
`train()` is the loop with evaluation and checkpoints; `cleanup()` closes what setup opened."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from kvfuse.align.heads import ridge_adapters, structured_adapter
from kvfuse.codecs import decode, decode_teachers
from kvfuse.data import extract_final_number, load_examples, render_prompt, resolve_prompt
from kvfuse.distill import DistillationModel, LossWeights
from kvfuse.eval.similarity import CKAAccumulator, kv_tokens, token_features
from kvfuse.eval.task_metrics import bleu, exact_match_accuracy, perplexity, rouge_l
from kvfuse.eval.visualize import plot_alignment, plot_layer_map
from kvfuse.fuse.router import FixedRouter, LearnableRouter, SimilarityRouter, compute_prototypes, \
    first_tokens_feature
from kvfuse.loss import KVDistillLoss
from kvfuse.models import kv_heads, load, make_student
from kvfuse.models.capture import capture_kv
from kvfuse.schedule import layer_weights as annealed_layer_weights, lr_factor, warm_in
from kvfuse.teacher.builder import AlignmentSettings, Teacher, TeacherKVBuilder, collate, max_positions
from kvfuse.teacher.loader import batch_to, check_finite_teachers, store_batches
from kvfuse.teacher.provenance import open_store_for_run, store_examples, student_fingerprint, teacher_fingerprint
from kvfuse.zspace import ZSpace
from train import checkpoint
from train.config import TrainConfig
from train.resume import check_data_order, data_order, write_data_order

# DeepSpeed's ZeRO-3 calls collectives that torch deprecates; the FutureWarning is addressed to DeepSpeed, not to
# our users, and would otherwise be printed into the progress bar every step.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")


class NonFiniteLoss(RuntimeError):
    """Training diverged: raised with the step, the first bad layer and the checkpoint saved before it."""


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingSession:
    def __init__(self, config: TrainConfig):
        """Reads the config and the process group; loads nothing."""
        self.config = config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config.device.startswith("cuda"):
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device(config.device)
        self.bf16 = config.dtype == "bf16" or (config.dtype == "auto" and self.device.type == "cuda")
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.tb = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_output()
        self._setup_data()
        self._log(f"loading the student {self.config.model_name} and the teachers, starting DeepSpeed")
        student, heads = self._setup_models()
        self._setup_loss(student, heads)
        self._setup_engine()
        self.start_step = self._setup_resume()
        self._setup_report()

    def _log(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def _setup_output(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        _set_seed(self.config.seed)

    def _setup_data(self) -> None:
        c = self.config
        if c.teacher_store:
            self.train_examples, self.val_examples = store_examples(c.teacher_store, c.dataset, self._log)
        else:
            self.train_examples, self.val_examples = load_examples(c.dataset, c.n_samples, c.n_val, c.seed)
        if not self.train_examples:
            raise ValueError(f"dataset {c.dataset!r} gave no training examples (n_samples={c.n_samples})")
        self.accum = c.accumulation(self.world)
        per_micro = c.micro_batch * self.world
        micro_per_epoch = math.ceil(len(self.train_examples) / per_micro)
        micro_per_epoch = math.ceil(micro_per_epoch / self.accum) * self.accum
        self.micro_per_epoch = micro_per_epoch
        self.steps_per_epoch = micro_per_epoch // self.accum
        self.total_steps = self.steps_per_epoch * c.epochs
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)

    def _teacher_names(self) -> tuple[list[str], list[str]]:
        c = self.config
        prompts = list(c.teacher_prompts)
        if c.teachers:
            names = list(c.teachers)
            if len(prompts) == 1:
                prompts = prompts * len(names)
        else:
            names = [c.model_name] * len(prompts)
        return names, [resolve_prompt(p) for p in prompts]

    def _setup_models(self):
        """The student (on the device), and the teachers: online models behind a TeacherKVBuilder, or the store.
        Returns (student, per-teacher (KV heads, head dim))."""
        c = self.config
        model_dtype = torch.bfloat16 if self.bf16 else torch.float32
        attn = self._attention_implementation()
        student, self.tokenizer = load(c.model_name, dtype=torch.float32, device="cpu", attn_implementation=attn)
        student_print, student_positions = student_fingerprint(self.tokenizer, student.config), \
            max_positions(student.config)
        student = make_student(student, c.student_layers)
        self.n_layers = student.config.num_hidden_layers
        self.student_heads = kv_heads(student.config)
        names, prompts = self._teacher_names()
        self.teacher_names, self.teacher_prompts = names, prompts
        settings = AlignmentSettings(c.layer_map, c.align_threshold, c.align_fallback, c.trim_whitespace)
        self.store, self.builder, self.eval_store = None, None, None
        if c.eval_teacher_store and not c.teacher_store:
            raise ValueError("eval_teacher_store needs teacher_store: it replaces the training store's teacher KV in "
                             "evaluations")
        if c.teacher_store:
            self.store = open_store_for_run(c.teacher_store, {
                "teachers": names, "teacher_prompts": prompts, "student_prompt": resolve_prompt(c.student_prompt),
                "student_layers": c.student_layers, "alignment": asdict(settings),
                "student_fingerprint": student_print, "teacher_fingerprints": [teacher_fingerprint(n) for n in names],
                "allow_long_sequences": c.allow_long_sequences}, self._log)
            heads = self._store_heads()
            self.eval_store = self._open_eval_store(c.eval_teacher_store, self.store)
        else:
            teachers, loaded = [], {}
            for name, prompt in zip(names, prompts):
                if name not in loaded:
                    loaded[name] = load(name, dtype=model_dtype, device=self.device, attn_implementation=attn)
                model, tok = loaded[name]
                teachers.append(Teacher(name, prompt, model, tok))
            heads = [kv_heads(t.model.config) for t in teachers]
            self.builder = TeacherKVBuilder(teachers, self.tokenizer, resolve_prompt(c.student_prompt),
                                            self.n_layers, settings, max_length=c.max_length,
                                            storage_dtype=model_dtype, device=self.device,
                                            student_max_positions=student_positions,
                                            allow_long_sequences=c.allow_long_sequences)
        if c.lora:
            from peft import LoraConfig, get_peft_model
            student = get_peft_model(student, LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        return student.to(self.device), heads

    def _attention_implementation(self) -> str | None:
        """flash_attn when installed on a GPU run, else PyTorch SDPA (which has flash kernels itself); tiny test
        models keep their eager default."""
        if self.config.model_name.startswith("tiny-"):
            return None
        if self.device.type == "cuda" and self.bf16:
            import importlib.util

            if importlib.util.find_spec("flash_attn") is not None:
                return "flash_attention_2"
        return "sdpa"

    def _open_eval_store(self, root, train_store):
        """The store evaluations read (None: the training store's): checked like the training store, and holding the
        same examples, so that the KV loss of a run trained from a compressed store is measured against another
        store's teacher KV (its bf16 original) on exactly the same tokens."""
        if not root:
            return None
        settings = train_store.settings
        same = {key: settings[key] for key in ("teachers", "teacher_prompts", "student_prompt", "student_layers",
                                               "alignment", "student_fingerprint", "teacher_fingerprints",
                                               "allow_long_sequences", "examples", "dataset_sha256")
                if key in settings}
        store = open_store_for_run(root, same, self._log)
        self._log(f"evaluating against the teacher KV of {root} (codec {store.codec}); training reads "
                  f"{self.config.teacher_store} (codec {train_store.codec})")
        return store

    def _store_heads(self) -> list[tuple[int, int]]:
        first = self.store[0]
        n = len([k for k in first if k.startswith("teacher") and k.endswith("/k")])
        return [(first[f"teacher{i}/k"].shape[1], first[f"teacher{i}/k"].shape[3]) for i in range(n)]

    def _setup_loss(self, student, heads) -> None:
        """The distillation objective around the student: KV loss with its initialised adapters, router, Z space."""
        c = self.config
        init = self._adapter_init(student, heads)
        router = self._router(len(self.teacher_names), student)
        kv_loss = KVDistillLoss(heads, self.student_heads, self.n_layers, init=init, lambda_k=c.lambda_k,
                                lambda_v=c.lambda_v, beta=c.beta, backend=c.loss_backend, check_finite=False)
        zspace = None
        if c.zspace:
            zspace = ZSpace([2 * h * d for h, d in heads], 2 * self.student_heads[0] * self.student_heads[1],
                            z_dim=c.z_dim, loss=c.z_loss, seed=c.seed)
        self.model = DistillationModel(student, kv_loss, router, zspace, entropy_weight=c.entropy_weight,
                                       entropy_target=c.entropy_target, router_k=c.router_k,
                                       checkpoint=c.gradient_checkpointing).to(self.device)

    @torch.no_grad()
    def _adapter_init(self, student, heads):
        c = self.config
        if c.adapter_init == "structured":
            return [(structured_adapter(h, d, *self.student_heads, n_layers=self.n_layers,
                                        rotary_dims=dims),) * 2
                    for (h, d), dims in zip(heads, self._rotary_dims(student, heads))]
        batch = self.teacher_batch(self._calibration_examples())
        cap_model = DistillationModel(student, None, None)
        student_kv = cap_model.student_kv(batch)
        pre_k, student_v = student_kv.cap.keys, student_kv.values
        init = []
        for i in range(len(heads)):
            wk = ridge_adapters(list(decode(batch["teacher_k"][i])), [k.float() for k in pre_k], batch["mask"])
            wv = ridge_adapters(list(decode(batch["teacher_v"][i])), [v.float() for v in student_v], batch["mask"])
            init.append((wk, wv))
        return init

    def _rotary_dims(self, student, heads) -> list[tuple[list[int], list[int]]]:
        """Per teacher, (r_t, r_s) per student layer for the structured init: the rotary dims capture reads off the
        models (partial rotary, NoPE layers), a teacher's taken from the teacher layers the layer map mixes into each
        student layer. Store-fed teachers are not loaded here: their heads count as fully rotary."""
        ids = torch.arange(1, 5, device=self.device)[None]   # any tokens: the rotary dims do not depend on them
        r_s = capture_kv(DistillationModel(student, None, None).lm, ids).rotary_dims   # LoRA: its base model
        out = []
        for i, (_, d_t) in enumerate(heads):
            if self.builder is None:
                out.append(([d_t] * self.n_layers, r_s))
                continue
            r_teacher = capture_kv(self.builder.teachers[i].model, ids).rotary_dims
            mixed = [self.builder.layer_maps[i][l].nonzero().flatten().tolist() for l in range(self.n_layers)]
            r_t = []
            for l, layers in enumerate(mixed):
                dims = {r_teacher[j] for j in layers}
                if len(dims) > 1:
                    raise ValueError(f"structured adapter init: student layer {l} mixes teacher {i}'s layers {layers} "
                                     f"with different rotary dims {sorted(dims)}; use adapter_init ridge")
                r_t.append(dims.pop())
            out.append((r_t, r_s))
        return out

    def _calibration_examples(self):
        # From the end of the training set: the train/val gap is measured on its start, which must not be the
        # data the adapters were fitted on.
        return self.train_examples[-self.config.calibration_samples:]

    def _router(self, n_teachers: int, student):
        c = self.config
        if c.router_type == "fixed":
            return FixedRouter(c.alpha)
        if c.router_type == "learnable":
            return LearnableRouter(student.get_input_embeddings().weight.shape[1], n_teachers,
                                   n_layers=self.n_layers, n_groups=c.router_groups)
        # similarity: prototypes from a calibration pass over training examples, in each teacher's KV space
        batch = self.teacher_batch(self._calibration_examples())
        feats = [first_tokens_feature(decode(v), batch["mask"], c.router_k) for v in batch["teacher_v"]]
        return SimilarityRouter([compute_prototypes(f[None])[0] for f in feats], c.router_temperature)

    def _setup_engine(self) -> None:
        c = self.config
        student_params = [p for p in self.model.student.parameters() if p.requires_grad]
        router_params = [p for p in self.model.router.parameters() if p.requires_grad]
        other = [p for n, p in self.model.named_parameters()
                 if p.requires_grad and not n.startswith(("student.", "router."))]
        lr_student = c.lr_lora if c.lora else c.lr_full
        groups = [{"params": student_params, "lr": lr_student}]
        if other:
            groups.append({"params": other, "lr": c.lr_lora})
        if router_params:
            groups.append({"params": router_params, "lr": c.lr_router})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        total_student = sum(p.numel() for p in self.model.student.parameters())
        self._log(f"trainable parameters: student {sum(p.numel() for p in student_params):,} of {total_student:,}"
                  f"{' (LoRA)' if c.lora else ''}; adapters and Z space {sum(p.numel() for p in other):,}; "
                  f"router {sum(p.numel() for p in router_params):,}")
        total = self.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, c.warmup_ratio))
        ds_config = {
            "train_micro_batch_size_per_gpu": c.micro_batch,
            "gradient_accumulation_steps": self.accum,
            "gradient_clipping": c.clip_grad,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    @property
    def data_order(self) -> dict:
        return data_order(self.config, self.world, self.train_examples,
                          None if self.store is None else self.store.hash)

    def _setup_resume(self) -> int:
        """The step to start from: 0, or the newest intact checkpoint's (train/checkpoint.py), whose data order must
        be this run's."""
        resumed = checkpoint.resume(self.engine, self.ckpt_dir, self._log,
                                    accept=lambda folder: check_data_order(folder, self.data_order))
        if resumed is None:
            return 0
        step = int(resumed.client_state["step"])
        self._log(f"resumed from {resumed.path} at step {step}")
        return step

    def _setup_report(self) -> None:
        """metrics.jsonl trimmed to the resumed step, TensorBoard, the resolved config and the alignment pictures."""
        self._truncate_metrics(self.start_step)
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"))
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.as_dict(), sort_keys=True))
            self._save_alignment_pictures()

    def _save_alignment_pictures(self) -> None:
        if self.builder is None:
            return
        example = self.train_examples[0]
        student = self.builder.student_view(example)
        for i, teacher in enumerate(self.builder.teachers):
            view = self.builder.teacher_view(example, i)
            A, _ = self.builder.align(student, view)
            plot_alignment(A, [student.text[a:b] for a, b in student.spans], [view.text[a:b] for a, b in view.spans],
                           self.out / f"alignment_teacher{i}.png",
                           title=f"A: student × teacher {i} ({teacher.name}), example {example.id}")
            plot_layer_map(self.builder.layer_maps[i].cpu(), self.out / f"layer_map_teacher{i}.png",
                           title=f"layer map M: student × teacher {i} ({teacher.name})")

    # ------------------------------------------------------------------------------------------------ batches
    def teacher_batch(self, examples, evaluation: bool = False) -> dict:
        """The collated batch of `examples` on the device (teacher entries compressed as the store holds them);
        `evaluation` reads the eval_teacher_store when there is one."""
        store = self.eval_store if evaluation and self.eval_store is not None else self.store
        if store is not None:
            samples = [dict(store.get(str(ex.id))) for ex in examples]
        else:
            samples = [dict(t, id=sid) for sid, t in self.builder.build(examples, to_host=False)]
        return batch_to(check_finite_teachers(collate(samples, len(self.teacher_names), self._pad_id)), self.device)

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def train_batches(self, epoch: int, skip: int = 0):
        """Device batches of this rank's micro-batches of `epoch` after the first `skip`. From a store, a
        background thread reads, collates and moves the next `store_prefetch` batches while the current one trains."""
        chunks = list(self.micro_batches(epoch))[skip:]
        if self.store is None:
            for examples in chunks:
                yield self.teacher_batch(examples)
            return
        yield from store_batches(self.store, [[str(ex.id) for ex in chunk] for chunk in chunks],
                                 len(self.teacher_names), self._pad_id, self.device, self.config.store_prefetch)

    def micro_batches(self, epoch: int):
        """This rank's micro-batches of `epoch` in a fixed, seeded order (the same on every run and resume)."""
        c = self.config
        order = torch.randperm(len(self.train_examples),
                               generator=torch.Generator().manual_seed(c.seed * 1000 + epoch)).tolist()
        per_global = c.micro_batch * self.world
        needed = self.micro_per_epoch * per_global
        order = (order * math.ceil(needed / len(order)))[:needed]   # wrap around: every rank gets full batches
        for m in range(self.micro_per_epoch):
            chunk = order[m * per_global:(m + 1) * per_global]
            mine = chunk[self.rank * c.micro_batch:(self.rank + 1) * c.micro_batch]
            yield [self.train_examples[i] for i in mine]

    # ------------------------------------------------------------------------------------------------ loss step
    def loss_step(self, batch: dict, step: int) -> tuple[torch.Tensor, dict, LossWeights, torch.Tensor]:
        """One micro-batch's forward during optimizer step `step` (0-based) under that step's loss weights (γ/δ
        warm-in, layer annealing): (loss, logs, weights, layer weights). Stops the run on a non-finite loss."""
        c = self.config
        weights = LossWeights(gamma=warm_in(step, self.total_steps, c.gamma, c.gamma_final, c.warmin_start),
                              delta=warm_in(step, self.total_steps, c.delta, c.delta_final, c.warmin_start))
        lw = annealed_layer_weights(step, self.total_steps, self.n_layers, c.layer_warmup_steps)
        self.engine.train()
        loss, logs = self.engine(batch, layer_weights=lw.to(self.device), weights=weights)
        self._check_finite(loss, logs, step + 1)
        return loss, logs, weights, lw

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> int:
        c = self.config
        start_step = self.start_step
        if start_step == 0:
            self.evaluate(0)
        step = start_step
        bar = tqdm(total=self.total_steps, initial=start_step, desc=f"phase {c.phase}", unit="step",
                   disable=self.rank != 0, dynamic_ncols=True)
        done = step >= self.total_steps
        for epoch in range(c.epochs):
            if done:
                break
            # micro-batches already trained before a resume: same order, skipped exactly (and never read)
            skip = min(max(0, start_step * self.accum - epoch * self.micro_per_epoch), self.micro_per_epoch)
            micro_seen = epoch * self.micro_per_epoch + skip
            for batch in self.train_batches(epoch, skip):
                micro_seen += 1
                if micro_seen % self.accum == 1 or self.accum == 1:
                    t0, tokens, input_tokens, acc_loss, acc_stats = time.perf_counter(), 0, 0, 0.0, None
                loss, logs, weights, lw = self.loss_step(batch, step)
                self.engine.backward(loss)
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.step()
                if boundary:
                    grad_norm = self._check_grad_norm(step + 1)
                tokens += int(batch["mask"].sum())
                input_tokens += int(batch["attention_mask"].sum())
                acc_loss += float(loss.detach()) / self.accum
                acc_stats = _accumulate(acc_stats, logs, self.accum)
                if micro_seen % self.accum:
                    continue
                step += 1
                elapsed = time.perf_counter() - t0
                acc_stats["loss"] = acc_loss
                acc_stats = self._mean_over_ranks(acc_stats)
                event = {"step": step, "split": "train", "lr": self.scheduler.get_last_lr()[0],
                         "tokens_per_s": tokens * self.world / elapsed, "gamma": weights.gamma,
                         "delta": weights.delta, "layer_weights": lw.tolist(), "epoch": epoch,
                         "grad_norm": grad_norm, "tokens": input_tokens * self.world}
                if self.device.type == "cuda":
                    event["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                event.update(acc_stats)
                self._event(event)
                if not isinstance(self.model.router, FixedRouter):
                    self._event({"step": step, "split": "router", "alpha": logs["alpha"].float().cpu(),
                                 "sample_ids": batch["ids"], "entropy": float(logs["router_entropy"])})
                bar.update(1)
                bar.set_postfix(loss=f"{acc_loss:.4g}", tok_s=f"{event['tokens_per_s']:.0f}")
                if step % c.eval_every == 0 and step < self.total_steps:
                    self.evaluate(step)
                if c.save_every > 0 and (step % c.save_every == 0 or step == self.total_steps):
                    self.save(step)
                if step >= self.total_steps:
                    done = True
                    break
        bar.close()
        self._finish(step)
        return 0

    def _finish(self, step: int) -> None:
        """The final evaluation (with generations), the Z-space picture and the HTML report."""
        self.evaluate(step, generate=self.config.n_generate > 0)
        if self.config.export_student:
            self._export_student()
        if self.model.zspace is not None:
            self._plot_zspace()
        if self.rank == 0:
            from kvfuse.eval.report import build_report
            self.tb.flush()
            self._log(f"report: {build_report(self.out)}")
        dist.barrier()

    def _export_student(self) -> None:
        """The trained student as a Hugging Face folder `<run>/student` (weights gathered from ZeRO-3, in the
        training dtype), for evaluation outside the trainer (bench/gpu_scale.py)."""
        lm = self.model.lm
        with deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=None):
            if self.rank == 0:
                lm.save_pretrained(self.out / "student", safe_serialization=True)
                self.tokenizer.save_pretrained(self.out / "student")
        dist.barrier()
        self._log(f"student saved: {self.out / 'student'}")

    def cleanup(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    # ------------------------------------------------------------------------------------------------ outputs
    def _event(self, event: dict) -> None:
        if self.rank != 0:
            return
        clean = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in event.items()}
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        for key, value in clean.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(f"{clean['split']}/{key}", value, clean["step"])

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop events the killed run logged past its last checkpoint: none lost, none doubled."""
        # A fresh start (step 0) keeps nothing: its own step-0 evaluation is logged again.
        if self.rank == 0:
            checkpoint.trim_metrics(self.out / "metrics.jsonl", step, self._log)

    def _mean_over_ranks(self, values: dict) -> dict:
        """Logged numbers averaged over ranks, so a step's log describes the global batch, not rank 0's part."""
        if self.world == 1:
            return values
        keys = sorted(values)
        flat = torch.tensor([x for k in keys for x in (values[k] if isinstance(values[k], list) else [values[k]])],
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(flat)
        flat = (flat / self.world).tolist()
        out, i = {}, 0
        for k in keys:
            n = len(values[k]) if isinstance(values[k], list) else 1
            out[k] = flat[i:i + n] if isinstance(values[k], list) else flat[i]
            i += n
        return out

    @torch.no_grad()
    def _plot_zspace(self, max_per_source: int = 200) -> None:
        """t-SNE/UMAP of the student's and each teacher's Z at the middle student layer (all ranks compute: ZeRO-3
        gathers parameters collectively; rank 0 draws)."""
        from kvfuse.eval.visualize import plot_embedding

        examples = (self.val_examples or self.train_examples)[:4]
        batch = self.teacher_batch(examples)
        batch["teacher_k"], batch["teacher_v"] = decode_teachers(batch["teacher_k"], batch["teacher_v"])
        self.engine.eval()
        cap, *_ = self.model.student_kv(batch)
        layer = self.n_layers // 2
        mask = batch["mask"]
        z_student, z_teachers = self.model.zspace.embed(
            kv_tokens(cap.keys[layer], cap.values[layer]),
            [kv_tokens(tk[layer], tv[layer]) for tk, tv in zip(batch["teacher_k"], batch["teacher_v"])])
        sample_of_token = [batch["ids"][b] for b in range(mask.shape[0]) for t in range(mask.shape[1])
                           if mask[b, t]]
        gen = torch.Generator().manual_seed(self.config.seed)
        pick = torch.randperm(len(sample_of_token), generator=gen)[:max_per_source]
        points, sources, samples = [], [], []
        for name, z in [("student", z_student)] + [(f"teacher {i}", z) for i, z in enumerate(z_teachers)]:
            points.append(z[mask.bool()][pick].float().cpu())
            sources += [name] * len(pick)
            samples += [sample_of_token[i] for i in pick.tolist()]
        if self.rank == 0:
            plot_embedding(torch.cat(points), sources, samples, self.out / "zspace_embedding.png",
                           title=f"Z space at student layer {layer}")

    def _check_finite(self, loss: torch.Tensor, logs: dict, step: int) -> None:
        flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1.0:
            return
        where = "unknown layer"
        for key in ("k_mse", "v_mse", "cos", "z_loss"):
            if key in logs:
                bad = torch.nonzero(~torch.isfinite(logs[key].float())).flatten().tolist()
                if bad:
                    where = f"layer {bad[0]} ({key})"
                    break
        tag = f"nonfinite-step{step:06d}"
        checkpoint.save(self.engine, self.ckpt_dir, tag, step - 1, resumable=False)
        raise NonFiniteLoss(f"non-finite loss at step {step}, first at {where}; the state before this step is saved "
                            f"as checkpoint {self.ckpt_dir / tag}. Lower the learning rate or check the inputs.")

    def _check_grad_norm(self, step: int) -> float | None:
        """The step's global gradient norm before clipping (logged: spikes show an unstable setup)."""
        # DeepSpeed skips an update whose gradient norm is not finite and carries on silently; a run that has stopped
        # learning is worse than a stopped run, so stop and say so.
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        if not math.isfinite(float(norm)):
            raise NonFiniteLoss(f"non-finite gradient norm at step {step} (the loss was finite): the update was "
                                "skipped. Check the inputs for zero or huge values, or lower the learning rate.")
        return float(norm)

    def save(self, step: int) -> None:
        try:
            checkpoint.save(self.engine, self.ckpt_dir, f"step{step:06d}", step,
                            add_files=lambda folder: write_data_order(folder, self.data_order))
        except (RuntimeError, OSError) as err:
            # torch.save on a full disk says only "unexpected pos …": name the likely cause and the knobs
            free = shutil.disk_usage(self.ckpt_dir).free / 1e9
            raise RuntimeError(f"saving checkpoint step{step:06d} to {self.ckpt_dir} failed: {err} ({free:.1f} GB "
                               "free there: a full disk? keep_checkpoints and save_every set how much is kept)") from err
        dist.barrier()
        if self.rank == 0:
            # A ZeRO checkpoint holds the optimizer state too (GBs even for a 135M student): keep the newest few.
            checkpoint.prune(self.ckpt_dir, self.config.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def _kv_eval(self, examples) -> dict:
        c = self.config
        sums, count, nll = None, 0, 0.0
        cka = [[CKAAccumulator() for _ in range(self.n_layers)] for _ in self.teacher_names]   # [teacher][layer]
        self.engine.eval()
        for first in tqdm(range(0, len(examples), c.micro_batch), desc="evaluating", unit="batch", leave=False,
                          disable=self.rank != 0, dynamic_ncols=True):
            batch = self.teacher_batch(examples[first:first + c.micro_batch], evaluation=True)
            _, logs = self.engine(batch, layer_weights=None, weights=LossWeights(), return_features=True)
            nll += float(self.model.rationale_nll(batch))
            sums = _accumulate(sums, logs, 1.0)
            count += 1
            teachers = list(zip(*decode_teachers(batch["teacher_k"], batch["teacher_v"])))
            for l, student in enumerate(logs["student_features"]):
                for i, (tk, tv) in enumerate(teachers):
                    cka[i][l].update(student, token_features(tk[l], tv[l], batch["mask"]))
        out = {k: ([x / count for x in v] if isinstance(v, list) else v / count) for k, v in sums.items()}
        out["ce"] = nll / count
        # student-vs-teacher KV similarity that no adapter, Z map or router choice can flatter: comparable across runs
        out["cka"] = [[acc.value() for acc in per_layer] for per_layer in cka]
        out["cka_mean"] = sum(map(sum, out["cka"])) / sum(map(len, out["cka"]))
        return out

    def evaluate(self, step: int, generate: bool = False) -> None:
        c = self.config
        if not self.val_examples:
            return
        val = self._kv_eval(self.val_examples)
        train = self._kv_eval(self.train_examples[: len(self.val_examples)])
        event = {"step": step, "split": "val", **val, "ppl": perplexity(val["ce"]),
                 "train_kv_loss": train["kv_loss"], "train_ce": train["ce"], "train_ppl": perplexity(train["ce"]),
                 "gap": (val["kv_loss"] - train["kv_loss"]) / max(abs(train["kv_loss"]), 1e-12)}
        generate = generate and c.n_generate > 0       # n_generate 0: the KV metrics alone
        if generate:
            event.update(self._generation_metrics(self.val_examples[: c.n_generate]))
        self._event(event)
        self._log(f"[eval step {step}] val kv {val['kv_loss']:.4g}  train kv {train['kv_loss']:.4g}  "
                  f"gap {100 * event['gap']:+.1f}%  val ppl {event['ppl']:.3g}  KV CKA {val['cka_mean']:.4f}"
                  + (f"  acc {event['accuracy']:.2f}  rougeL {event['rouge_l']:.3f}" if generate else ""))

    @torch.no_grad()
    def _generation_metrics(self, examples) -> dict:
        c = self.config
        student = self.model.student
        student.eval()
        prompt = resolve_prompt(c.student_prompt)
        predictions, texts = [], []
        for ex in tqdm(examples, desc=f"generating up to {c.generate_max_new_tokens} tokens", unit="question",
                       leave=False, disable=self.rank != 0, dynamic_ncols=True):
            text = render_prompt(self.tokenizer, prompt, ex.question)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(
                self.tokenizer, "chat_template", None)).input_ids.to(self.device)
            out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=c.generate_max_new_tokens, synced_gpus=self.world > 1,
                                   pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            generated = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            texts.append(generated)
            predictions.append(extract_final_number(generated))
        if self.rank == 0:
            with open(self.out / "generations.jsonl", "a") as fh:
                for ex, gen in zip(examples, texts):
                    fh.write(json.dumps({"id": ex.id, "generated": gen, "gold": ex.answer}) + "\n")
        return {"accuracy": exact_match_accuracy(predictions, [ex.answer for ex in examples]),
                "rouge_l": rouge_l(texts, [ex.rationale for ex in examples]),
                "bleu": bleu(texts, [ex.rationale for ex in examples])}


def _accumulate(acc: dict | None, logs: dict, divisor: float) -> dict:
    """Running mean of the logged scalars and per-layer vectors (k_mse, v_mse, cos, z_loss)."""
    acc = {} if acc is None else acc
    for key in ("kv_loss", "ce", "attn_kl", "router_entropy", "k_mse", "v_mse", "cos", "z_loss"):
        if key in logs:
            value = logs[key].detach().float().cpu()
            value = value.tolist() if value.dim() else float(value)
            if isinstance(value, list):
                prev = acc.get(key, [0.0] * len(value))
                acc[key] = [p + v / divisor for p, v in zip(prev, value)]
            else:
                acc[key] = acc.get(key, 0.0) + value / divisor
    return acc
