"""sinkscope: measure, explain and remove attention sinks."""
