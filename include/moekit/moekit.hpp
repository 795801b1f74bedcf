// SPDX-License-Identifier: Apache-2.0
// Umbrella header: the whole public API of moekit.
#pragma once

#include "moekit/batch.hpp"
#include "moekit/blocks.hpp"
#include "moekit/cpu.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/aux.hpp"
#include "moekit/routers/depth.hpp"
#include "moekit/routers/drllm.hpp"
#include "moekit/routers/expert_choice.hpp"
#include "moekit/routers/gru.hpp"
#include "moekit/routers/mor.hpp"
#include "moekit/progress.hpp"
#include "moekit/routers/prototype.hpp"
#include "moekit/routers/sinkhorn.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"
#include "moekit/version.hpp"
