"""What fairseq's label-smoothed cross-entropy logs, for the plugin's criteria that add a loss on top of it."""

from fairseq import utils


def label_smoothed_logging_output(criterion, model, net_output, sample, loss, nll_loss):
    """``(sample_size, logging_output)`` as ``LabelSmoothedCrossEntropyCriterion.forward`` builds them."""
    sample_size = sample["target"].size(0) if criterion.sentence_avg else sample["ntokens"]
    logging_output = {
        "loss": loss.data,
        "nll_loss": nll_loss.data,
        "ntokens": sample["ntokens"],
        "nsentences": sample["target"].size(0),
        "sample_size": sample_size,
    }
    if criterion.report_accuracy:
        n_correct, total = criterion.compute_accuracy(model, net_output, sample)
        logging_output["n_correct"] = utils.item(n_correct.data)
        logging_output["total"] = utils.item(total.data)
    return sample_size, logging_output
