"""TST's pieces for Megatron-LM's training loop (`megatron.training.training.pretrain`).

    arguments   the --tst-* flags (extra_args_provider) and what TST refuses, with the reasons
    argv        --recipe / --config: flags placed before the command line's
    run         what the plugin derives once per run (TST settings, the sample plan), `current()`
    providers   model provider (TSTGPTModel as gpt_builder builds GPTModel), dataset provider (the sample stream)
    forward     get_batch (TP broadcast of both phases' micro-batches, CP slicing) and forward_step / loss_func
    logging     the phase and raw tokens in Megatron-LM's log line, --metrics-jsonl, TensorBoard/W&B scalars
    resume      before a resume: the checkpoint's sample stream and LR schedule against this run's
    data_checks before heavy work: .bin/.idx, token ids, empty member splits

The entry point is `megatron_tst.pretrain`; the bends of Megatron-LM's internals it needs are in
`megatron_tst.platform`.
"""
