"""``diffalign demo``: the image demo (:mod:`~diffalign.demo.image`) and the language-model demo
(:mod:`~diffalign.demo.text`), end to end on the toy worlds. They sit above the trainer, which they run."""
