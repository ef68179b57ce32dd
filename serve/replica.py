"""What the judge and rewriter deployments share: a replica holds its section's config, the backend it
names, and the batching its config asks for; it reports the settings a run attaching to it compares
with its own; and its app gets replicas, request limits and resources from the same section."""

from __future__ import annotations

from sip.config import DataConfig


def teacher_settings(cfg, data_cfg: DataConfig) -> dict:
    """A judge's or rewriter's deployment section and data section, as JSON: what `attach` compares."""
    return {"deployment": cfg.model_dump(mode="json"), "data": data_cfg.model_dump(mode="json")}


class TeacherReplica:
    def __init__(self, cfg, data_cfg: DataConfig, backend, batched):
        """`batched`: the replica's `serve.batch` method, sized from the config."""
        self.cfg, self.data_cfg, self.backend = cfg, data_cfg, backend
        batched.set_max_batch_size(cfg.max_batch_size)
        batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def settings(self) -> dict:
        """What this replica serves with: a run that attaches to it checks these against its own."""
        return teacher_settings(self.cfg, self.data_cfg)


def teacher_app(deployment, cfg, data_cfg: DataConfig):
    """The deployment bound to its config: replica count or autoscaling, request limit and resources."""
    scaling = {"autoscaling_config": cfg.autoscaling} if cfg.autoscaling else {"num_replicas": cfg.num_replicas}
    options = deployment.options(max_ongoing_requests=cfg.max_ongoing_requests,
                                 ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}, **scaling)
    return options.bind(cfg, data_cfg)
