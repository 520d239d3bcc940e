#!/usr/bin/env python3
"""Writes the .npy files tests/test_npy.cpp reads, with numpy.save (made with numpy 2.4.6, Python 3.11.7).

Each file holds a small array whose values the test recomputes:
v[i] = i * 0.5 - 3 in C order of the array's shape (for bool: i % 3 == 0;
for unsigned: i), saved in the dtype and layout the name says."""
import os
import numpy as np

here = os.path.dirname(os.path.abspath(__file__))


def values(shape, dtype):
    n = int(np.prod(shape)) if shape else 1
    i = np.arange(n)
    if np.dtype(dtype).kind == "b":
        v = i % 3 == 0
    elif np.dtype(dtype).kind == "u":
        v = i
    else:
        v = i * 0.5 - 3
    return v.astype(dtype).reshape(shape)


def save(name, arr):
    np.save(os.path.join(here, name), arr)


save("f4_2x3.npy", values((2, 3), "<f4"))
save("f8_fortran_3x4.npy", np.asfortranarray(values((3, 4), "<f8")))
save("f4_fortran_2x3x2.npy", np.asfortranarray(values((2, 3, 2), "<f4")))
save("i8_5.npy", values((5,), "<i8"))
save("big_f4_2x2.npy", values((2, 2), ">f4"))
save("big_i4_3.npy", values((3,), ">i4"))
save("f2_4.npy", values((4,), "<f2"))
save("u1_6.npy", values((6,), "u1"))
save("b1_5.npy", values((5,), "?"))
save("f8_scalar.npy", values((), "<f8"))
save("f4_empty_0x3.npy", values((0, 3), "<f4"))
save("f4_2x1x2x2.npy", values((2, 1, 2, 2), "<f4"))
