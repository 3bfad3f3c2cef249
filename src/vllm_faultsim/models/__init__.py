"""The SimPy twins of vLLM's components, one module each; they import nothing above them."""
