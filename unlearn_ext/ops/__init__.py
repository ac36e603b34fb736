from unlearn_ext.ops.sq_grad import sq_grad_conv2d, sq_grad_embedding, sq_grad_linear  # noqa: F401
