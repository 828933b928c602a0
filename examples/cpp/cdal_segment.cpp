// cdal_segment: segment one RGB (or grey) TIFF tile with an exported cDAL sampler.
//
//   cdal_segment MODEL.pt|MODEL.pt2 INPUT.tif OUTPUT.tif [--seed N]
//
// MODEL is `cdal-fast export --format torchscript` (.pt) or `--format aoti` (.pt2) output. Its
// forward(image, seed) takes float32 (1, C, H, W) pixels on the 0-255 scale and an int64 seed and
// returns (probability, uncertainty). The mask (255 = object) is written as a deflate TIFF.
#include <torch/script.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <tiffio.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Image {
  int width = 0, height = 0;
  std::vector<uint32_t> rgba;  // top-left origin
};

Image read_tiff(const std::string& path) {
  TIFFSetWarningHandler(nullptr);
  TIFFSetErrorHandler(nullptr);  // our own message says what went wrong
  TIFF* tif = TIFFOpen(path.c_str(), "r");
  if (!tif) throw std::runtime_error("cannot read TIFF " + path + " (missing file or not a TIFF)");
  Image img;
  uint32_t w = 0, h = 0;
  TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &w);
  TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &h);
  img.width = static_cast<int>(w);
  img.height = static_cast<int>(h);
  img.rgba.resize(static_cast<size_t>(w) * h);
  const int ok = w && h && TIFFReadRGBAImageOriented(tif, w, h, img.rgba.data(), ORIENTATION_TOPLEFT, 0);
  TIFFClose(tif);
  if (!ok) throw std::runtime_error("cannot decode TIFF " + path + " (unsupported or corrupt)");
  return img;
}

void write_mask(const std::string& path, const at::Tensor& mask) {  // (H, W) uint8
  const int h = static_cast<int>(mask.size(0)), w = static_cast<int>(mask.size(1));
  const std::string tmp = path + ".partial";
  TIFF* tif = TIFFOpen(tmp.c_str(), "w");
  if (!tif) throw std::runtime_error("cannot write " + path);
  TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, w);
  TIFFSetField(tif, TIFFTAG_IMAGELENGTH, h);
  TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 1);
  TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 8);
  TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
  TIFFSetField(tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
  TIFFSetField(tif, TIFFTAG_COMPRESSION, COMPRESSION_ADOBE_DEFLATE);
  TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, 64);
  const at::Tensor m = mask.contiguous();
  for (int y = 0; y < h; ++y) {
    if (TIFFWriteScanline(tif, m[y].data_ptr<uint8_t>(), y, 0) < 0) {
      TIFFClose(tif);
      throw std::runtime_error("write failed for " + path);
    }
  }
  TIFFClose(tif);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename to " + path);
}

std::string it_shape(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.pt|MODEL.pt2 INPUT.tif OUTPUT.tif [--seed N]\n", argv[0]);
    return 2;
  }
  const std::string model_path = argv[1], in_path = argv[2], out_path = argv[3];
  int64_t seed = 0;
  for (int i = 4; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--seed") seed = std::atoll(argv[i + 1]);
  }
  try {
    if (!std::ifstream(model_path).good()) throw std::runtime_error("model file not found: " + model_path);
    const bool aoti = ends_with(model_path, ".pt2");
    std::unique_ptr<torch::jit::Module> script;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
    int64_t channels = 3;
    double threshold = 0.5;  // binary models: the model's own (exports before thresholds were settable: 0.5)
    std::vector<int64_t> fixed_shape;  // AOTInductor packages are compiled for one input shape
    if (aoti) {
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(model_path);
      const auto meta = package->get_metadata();
      const auto it = meta.find("cdal_input_shape");
      if (it == meta.end()) throw std::runtime_error(model_path + " is not a cdal-fast AOTInductor package");
      size_t pos = 0;
      const std::string& s = it->second;
      while (pos < s.size()) {
        const size_t comma = s.find(',', pos);
        fixed_shape.push_back(std::stoll(s.substr(pos, comma - pos)));
        pos = comma == std::string::npos ? s.size() : comma + 1;
      }
      channels = fixed_shape.at(1);
      const auto thr = meta.find("cdal_threshold");
      if (thr != meta.end()) threshold = std::stod(thr->second);
    } else {
      script = std::make_unique<torch::jit::Module>(torch::jit::load(model_path));
      script->eval();
      channels = script->attr("img_channels").toInt();
      if (script->hasattr("threshold")) threshold = script->attr("threshold").toDouble();
    }

    const Image img = read_tiff(in_path);
    // libtiff's RGBA raster packs R, G, B, A into the low to high bytes of each pixel
    at::Tensor image = torch::empty({3, img.height, img.width}, torch::kFloat32);
    float* px = image.data_ptr<float>();
    const size_t n = img.rgba.size();
    for (size_t i = 0; i < n; ++i) {
      px[i] = static_cast<float>(TIFFGetR(img.rgba[i]));
      px[n + i] = static_cast<float>(TIFFGetG(img.rgba[i]));
      px[2 * n + i] = static_cast<float>(TIFFGetB(img.rgba[i]));
    }
    if (channels == 1) image = image.mean(0, /*keepdim=*/true);
    image = image.unsqueeze(0).contiguous();  // (1, C, H, W), 0-255
    if (!fixed_shape.empty() && image.sizes() != at::IntArrayRef(fixed_shape)) {
      throw std::runtime_error("wrong input size: the package was exported for input " + it_shape(fixed_shape) +
                               ", the TIFF gives " + it_shape(image.sizes().vec()) +
                               " (re-export with --batch/--size)");
    }
    const at::Tensor seed_t = torch::tensor(seed, torch::kInt64);

    at::Tensor prob;
    torch::NoGradGuard no_grad;
    if (aoti) {
      std::vector<at::Tensor> out = package->run({image, seed_t});
      prob = out.at(0);
    } else {
      prob = script->forward({image, seed_t}).toTuple()->elements().at(0).toTensor();
    }
    // binary: probability >= the model's threshold; several classes: argmax label
    at::Tensor mask = prob.size(1) == 1 ? (prob[0][0] >= threshold).to(torch::kUInt8) * 255
                                        : prob[0].argmax(0).to(torch::kUInt8);
    write_mask(out_path, mask);
    std::printf("wrote %s (%dx%d) mean_probability=%.6f object_fraction=%.6f\n", out_path.c_str(), img.width,
                img.height, prob.mean().item<double>(), (mask > 0).to(torch::kFloat32).mean().item<double>());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
