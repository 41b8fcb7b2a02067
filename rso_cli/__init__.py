"""The `rso` command line and the applications built on both halves (the demo): the only
package that imports both `beam_pipelines` and `trainer`."""
