"""HTTP routes: native, TensorFlow Serving REST and KServe v2, each on its own router."""
