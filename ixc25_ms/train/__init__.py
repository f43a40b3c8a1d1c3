"""Fine-tuning IXC2.5 on MindSpore with the official recipe's semantics (`ixc25-finetune`)."""
