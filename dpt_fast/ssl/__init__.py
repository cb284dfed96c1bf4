"""The end-to-end semi-supervised learners of the paper's CIFAR-10 protocol: FreeMatch and FixMatch (TorchSSL).

    augment.py  weak (flip + crop) and strong (TorchSSL's RandAugment + Cutout) views, batched tensor ops
    losses.py   FreeMatch's self-adaptive thresholds and fairness term, FixMatch's fixed threshold, the losses
    train.py    the resumable training loop, predictions of the EMA model, the saved classifier
"""
METHODS = ("freematch", "fixmatch")  # stage1.method values that train a learner end to end
