"""The only modules that touch protobuf: CheckRequest → Request, Decision → CheckResponse."""
