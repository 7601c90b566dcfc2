"""The FSDP2 learner: batch layout, the shared-prefix forward, model building, the weight gather, the per-rank worker and the Ray group."""
