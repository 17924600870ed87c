"""Benchmark: maml.registration's parameter maps through itk-elastix and through the ``elastix``
program (Debian package ``elastix``) on the same phantom case, in one run.

Prints the wall time of each (itk-elastix after its one-off start-up, which is printed apart), their
ratio, and how well the two results agree: mean and largest difference of the displacement fields
over the fixed image's body and inside the liver, and each one's error against the phantom's true
motion (mean target registration error in the liver).

    .venv/bin/python benchmarks/bench_registration.py [--seed 0] [--size demo] [--preset deformable]
        [--parameter-dir DIR]

Skips (exit 0, with a message) when the ``elastix`` program is not installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MAMLSegmentation"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="demo")
    parser.add_argument("--preset", default="deformable", choices=("rigid", "affine", "deformable"))
    parser.add_argument("--parameter-dir", help="also keep the elastix parameter files in this folder")
    args = parser.parse_args(argv)

    elastix_exe = shutil.which("elastix")
    transformix_exe = shutil.which("transformix")
    if not elastix_exe or not transformix_exe:
        print("SKIPPED: the elastix/transformix programs are not installed (apt-get install elastix)")
        return 0

    import numpy as np
    import SimpleITK as sitk
    import itk

    from maml import registration as reg
    from maml.synthetic import make_case

    version = subprocess.run([elastix_exe, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"elastix program: {elastix_exe} ({version}); itk-elastix {getattr(itk, '__version__', '?')}")

    t0 = time.perf_counter()
    case = make_case(args.seed, args.size)
    fixed, moving = case.images["venous"], case.images["arterial"]
    liver = sitk.GetArrayFromImage(case.labels["venous"]) > 0
    body = sitk.GetArrayFromImage(fixed) > -500
    print(f"case {case.case_id} ({args.size}): fixed {fixed.GetSize()} at "
          f"{tuple(round(s, 3) for s in fixed.GetSpacing())} mm, moving {moving.GetSize()} "
          f"(made in {time.perf_counter() - t0:.1f} s); preset {args.preset}")
    maps = reg.parameter_maps(args.preset)

    with tempfile.TemporaryDirectory(prefix="bench_registration_") as tmp:
        tmp = Path(tmp)
        sitk.WriteImage(fixed, str(tmp / "fixed.mha"))
        sitk.WriteImage(moving, str(tmp / "moving.mha"))
        pfiles = [reg.write_parameter_file(m, tmp / f"parameters.{i}.txt") for i, m in enumerate(maps)]
        if args.parameter_dir:
            Path(args.parameter_dir).mkdir(parents=True, exist_ok=True)
            for p in pfiles:
                shutil.copy(p, Path(args.parameter_dir) / p.name)
            print(f"parameter files kept in {args.parameter_dir}")

        # --- itk-elastix: the same maps in one call (start-up paid apart first).
        t0 = time.perf_counter()
        warm = itk.ParameterObject.New()
        warm_map = dict(maps[0])
        warm_map["NumberOfResolutions"] = ["1"]
        warm_map["MaximumNumberOfIterations"] = ["2"]
        warm.AddParameterMap(warm_map)
        small = sitk.Shrink(fixed, [4, 4, 4])
        itk.elastix_registration_method(reg.sitk_to_itk(small), reg.sitk_to_itk(small), parameter_object=warm,
                                        log_to_console=False)
        startup = time.perf_counter() - t0

        fixed_itk, moving_itk = reg.sitk_to_itk(fixed), reg.sitk_to_itk(moving)
        parameters = itk.ParameterObject.New()
        for m in maps:
            parameters.AddParameterMap(m)
        t0 = time.perf_counter()
        method = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
        method.SetParameterObject(parameters)
        method.SetLogToConsole(False)
        method.UpdateLargestPossibleRegion()
        time_itk = time.perf_counter() - t0
        transform_itk = reg._itk_transform_to_sitk(method.ConvertToItkTransform(method.GetCombinationTransform()))

        # --- maml.registration.register (staged, plus resampling and the quality report).
        t0 = time.perf_counter()
        result = reg.register(fixed, moving, args.preset, engine="elastix")
        time_maml = time.perf_counter() - t0

        # --- the elastix program with the same parameter files, then transformix for its field.
        out = tmp / "elastix_out"
        out.mkdir()
        command = [elastix_exe, "-f", str(tmp / "fixed.mha"), "-m", str(tmp / "moving.mha"), "-out", str(out)]
        for p in pfiles:
            command += ["-p", str(p)]
        t0 = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        time_cli = time.perf_counter() - t0
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:])
            print("FAILED: the elastix program failed (see its output above)")
            return 1
        last = out / f"TransformParameters.{len(maps) - 1}.txt"
        field_dir = tmp / "transformix_out"
        field_dir.mkdir()
        run = subprocess.run([transformix_exe, "-def", "all", "-tp", str(last), "-out", str(field_dir)],
                             capture_output=True, text=True)
        field_files = sorted(field_dir.glob("deformationField.*"))
        if run.returncode != 0 or not field_files:
            print(run.stdout[-3000:], run.stderr[-3000:])
            print("FAILED: transformix could not write the deformation field")
            return 1
        field_cli_img = sitk.ReadImage(str([f for f in field_files if f.suffix != ".raw"][0]))
        field_cli = sitk.GetArrayFromImage(field_cli_img).astype(np.float64)

    def field(transform):
        return sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(),
            fixed.GetDirection()))

    field_itk = field(transform_itk)
    field_maml = field(result.transform)
    field_true = field(case.arterial_to_venous)

    def compare(a, b, mask):
        d = np.linalg.norm(a - b, axis=-1)[mask]
        return f"mean {d.mean():.3f} mm, max {d.max():.3f} mm"

    print()
    print(f"itk-elastix start-up (first use in the process): {startup:6.1f} s")
    print(f"itk-elastix, maps in one call:                   {time_itk:6.1f} s")
    print(f"maml.registration.register (staged + quality):   {time_maml:6.1f} s")
    print(f"elastix program:                                 {time_cli:6.1f} s")
    print(f"ratio elastix program / itk-elastix:             {time_cli / time_itk:6.2f}")
    print(f"ratio maml register / elastix program:           {time_maml / time_cli:6.2f}")
    print()
    print("agreement of the displacement fields (fixed grid):")
    print(f"  itk-elastix vs elastix program, body:  {compare(field_itk, field_cli, body)}")
    print(f"  itk-elastix vs elastix program, liver: {compare(field_itk, field_cli, liver)}")
    print(f"  maml register vs itk-elastix, liver:   {compare(field_maml, field_itk, liver)}")
    print("error against the true motion (TRE inside the liver):")
    print(f"  no registration: {compare(np.zeros_like(field_true), field_true, liver)}")
    print(f"  itk-elastix:     {compare(field_itk, field_true, liver)}")
    print(f"  elastix program: {compare(field_cli, field_true, liver)}")
    print(f"  maml register:   {compare(field_maml, field_true, liver)}")
    print(f"maml quality: NMI {result.quality['before']} -> {result.quality['after']}, "
          f"warning: {result.quality['warning']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
