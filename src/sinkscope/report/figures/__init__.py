"""Every matplotlib figure sinkscope draws, one module per analysis, in the style of `sinkscope.report.palette`."""
