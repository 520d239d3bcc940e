// The transformer layers' device tests of tests/gpu/ (SelfAttention, Dropout,
// Embedding, BertEmbeddings, BertLayer, BertEncoder, BertModel) on the
// project's CPU execution of its CUDA code.
#include "test_device_transformer.cu"
