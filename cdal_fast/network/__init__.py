"""The cDAL networks (spec section 7): config, layers, generator, discriminator, FIR resampling, the
fused custom ops' wrappers and the diffusion schedule. Maths only: no file I/O, no sampling loop."""
